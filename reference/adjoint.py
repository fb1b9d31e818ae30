"""(being written) SPEC §9.1 adjoint."""
def backward(*a, **k):
    raise NotImplementedError
