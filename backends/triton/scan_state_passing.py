"""Phase 3 of the chunked scan (SPEC §8, reference/chunked.py `state_passing`): the state at
the entry of every segment, and the final states.

Per (sequence, head, block of BP state rows), walking the sequence's segments in order with
the state E (absolute rotary frame, fp32 registers) and the angle theta0 (the angle before the
segment's first token, wrapped into [0, 2 pi)):

    E_0      = S_init + DT_0 (1 - lam_0) sum_r vt_init,r k_init,r^T      (pending beta term of
               the input states, SPEC §8.1 'Chunk-state convention'; 0 without input states)
    theta0_0 = wrap(theta_init)
    for each segment s:
        Erel_s = E_s Rot(theta0_s)             (store: the entry state in the segment's frame,
                                                the frame its chunk-output kernel works in)
        E_{s+1} = e^{T_s} E_s + Lrel_s Rot(theta0_s)^T
        theta0_{s+1} = wrap(theta0_s + Phi_s)

Rot acts on each state row's column pairs, so both rotations are elementwise on the pair
halves. The final states (SPEC §2 'Final states'): SSM = E after the last segment (it holds no
pending term: gamma' of the last token is 0), angle = theta0 after the last segment, K = the
last token's rotated biased k for every rank, V = the last token's raw v. An empty sequence
returns its initial states (angle wrapped) or zeros.

With ESPLIT > 1 the segments here are phase 2's sub-segments (scan_chunk_state.py); every
sub-segment's entry is stored, phase 4 reads every ESPLIT-th.

Grid: (H * cdiv(P, BP), S); every program walks its sequence's segments (a few to a few
dozen steps of one BP x N tile load, fma and store).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .scan_common import (_cast, _cos_sin, _first_slot, _load_state, _pair_cols, _rotate, _sigmoid, _store_state,
                          _wrap)


def grid(H: int, P: int, BP: int, S: int):
    return (H * triton.cdiv(P, BP), S)


@triton.jit
def scan_state_passing_kernel(
    lrel_ptr, tot_ptr, phi_ptr, erel_ptr, cu_ptr,
    dt_ptr, trap_ptr, mv_ptr, k_ptr, kb_ptr, v_ptr,
    ang_in_ptr, ssm_in_ptr, k_in_ptr, v_in_ptr, ang_out_ptr, ssm_out_ptr, k_out_ptr, v_out_ptr,
    s_kb, s_kt, s_kr, s_kg, s_vb, s_vt, s_vh,
    L, H, G, NSEG,
    R: tl.constexpr, N: tl.constexpr, NHP: tl.constexpr, P: tl.constexpr, PPOW: tl.constexpr,
    BP: tl.constexpr, A: tl.constexpr, SEGLEN: tl.constexpr,
    PAIR_HALF: tl.constexpr, TRAP: tl.constexpr, HAS_MV: tl.constexpr, VARLEN: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_LOCAL: tl.constexpr, FINAL: tl.constexpr, FAST_TRIG: tl.constexpr,
    INTERP: tl.constexpr, ESPLIT: tl.constexpr = 1,
):
    NPB: tl.constexpr = (P + BP - 1) // BP
    NH: tl.constexpr = N // 2
    pid0 = tl.program_id(0)
    seq = tl.program_id(1)
    h = pid0 // NPB
    pb = pid0 % NPB
    if VARLEN:
        bos = tl.load(cu_ptr + seq)
        eos = tl.load(cu_ptr + seq + 1)
        b = seq * 0
    else:
        bos = seq * 0
        eos = bos + L
        b = seq
    start = _first_slot(seq, bos, NSEG, SEGLEN, VARLEN)
    nseg = tl.cdiv(eos - bos, SEGLEN)
    nonempty = eos > bos
    # vector masks from the scalar condition through limits (a vector & scalar-bool mask is
    # not a bool mask in the interpreter)
    lim_ne = tl.where(nonempty, 1 << 20, 0)
    lim_e = tl.where(nonempty, 0, 1 << 20)
    j = tl.arange(0, NHP)
    jm = j < NH
    am = j < A
    c0, c1 = _pair_cols(j, N, PAIR_HALF)
    p = pb * BP + tl.arange(0, BP)
    pm = p < P
    sh = seq * H + h
    if HAS_INIT:
        e0, e1 = _load_state(ssm_in_ptr, sh.to(tl.int64) * P * N, p, j, P, N, NH, PAIR_HALF)
        theta = _wrap(tl.load(ang_in_ptr + sh * A + j, mask=am, other=0.0))
        if TRAP:
            # pending beta term of the input states (euler: lam = 1, no such term)
            t_first = (b * H + h).to(tl.int64) * L + bos
            m0 = nonempty
            dt0 = tl.load(dt_ptr + t_first, mask=m0, other=0.0)
            lam0 = _sigmoid(tl.load(trap_ptr + t_first, mask=m0, other=0.0))
            pend = dt0 * (1.0 - lam0)
            vin = tl.load(v_in_ptr + sh * P + p, mask=pm, other=0.0).to(tl.float32) * pend
            for r in tl.static_range(R):
                krow = ((seq * R + r) * H + h) * N
                k0 = tl.load(k_in_ptr + krow + c0, mask=jm, other=0.0)
                k1 = tl.load(k_in_ptr + krow + c1, mask=jm, other=0.0)
                if HAS_MV:
                    vr = vin * tl.load(mv_ptr + (h * R + r) * P + p, mask=pm, other=0.0)
                else:
                    vr = vin
                e0 += vr[:, None] * k0[None, :]
                e1 += vr[:, None] * k1[None, :]
    else:
        e0 = tl.zeros([BP, NHP], dtype=tl.float32)
        e1 = tl.zeros([BP, NHP], dtype=tl.float32)
        theta = tl.zeros([NHP], dtype=tl.float32)
    # the next segment's local state, totals and angle totals are loaded one segment ahead
    # (the loop is a chain of small dependent steps: load latency would dominate it)
    if HAS_LOCAL:
        nl0, nl1 = _load_state(lrel_ptr, (start * H + h).to(tl.int64) * P * N, p + tl.where(nseg > 0, 0, P),
                               j, P, N, NH, PAIR_HALF)
        ntot = tl.load(tot_ptr + start * H + h, mask=nseg > 0, other=0.0)
        nph = tl.load(phi_ptr + (start * H + h) * A + j, mask=am & (j < tl.where(nseg > 0, 1 << 20, 0)),
                      other=0.0)
    for s in range(0, nseg):
        slot = start + s
        base = (slot * H + h).to(tl.int64) * P * N
        if HAS_LOCAL:
            l0, l1, stot, sph = nl0, nl1, ntot, nph
            nxt = s + 1 < nseg
            nl0, nl1 = _load_state(lrel_ptr, base + H * P * N, p + tl.where(nxt, 0, P), j, P, N, NH,
                                   PAIR_HALF)
            ntot = tl.load(tot_ptr + (slot + 1) * H + h, mask=nxt, other=0.0)
            nph = tl.load(phi_ptr + ((slot + 1) * H + h) * A + j, mask=am & (j < tl.where(nxt, 1 << 20, 0)),
                          other=0.0)
        c, sn = _cos_sin(theta, FAST_TRIG)
        # E Rot(theta0): row pairs (x0, x1) -> (x0 c + x1 s, -x0 s + x1 c)
        _store_state(erel_ptr, base, p, j, e0 * c + e1 * sn, e1 * c - e0 * sn, P, N, NH, PAIR_HALF,
                     INTERP)
        if HAS_LOCAL:
            use = (s // ESPLIT + 1) * ESPLIT < nseg   # phase 2 left the last phase-4 segment's out
            if FINAL:
                use = s < nseg
            if use:
                l0, l1 = _rotate(l0, l1, c, sn)
                decay = tl.exp(stot)
                e0 = e0 * decay + l0
                e1 = e1 * decay + l1
                if A > 0:
                    theta = _wrap(theta + sph)
    if FINAL:
        _store_state(ssm_out_ptr, sh.to(tl.int64) * P * N, p, j, e0, e1, P, N, NH, PAIR_HALF, INTERP)
        if pb == 0:
            if A > 0:
                tl.store(ang_out_ptr + sh * A + j, theta, mask=am)
            # V state: the last token's raw v (or the input V state for an empty sequence)
            pa = tl.arange(0, PPOW)
            pam = pa < P
            t_last = tl.maximum(eos - 1, 0)
            v_last = tl.load(v_ptr + b.to(tl.int64) * s_vb + t_last.to(tl.int64) * s_vt + h * s_vh + pa,
                             mask=pam & (pa < lim_ne), other=0.0)
            if HAS_INIT:
                v_prev = tl.load(v_in_ptr + sh * P + pa, mask=pam & (pa < lim_e), other=0.0)
                v_last = tl.where(nonempty, v_last, v_prev)
            tl.store(v_out_ptr + sh * P + pa, _cast(v_last, v_out_ptr.dtype.element_ty, INTERP), mask=pam)
            # K state: Rot(theta_final)(K_last + K_bias) per rank
            g = h // (H // G)
            c, sn = _cos_sin(theta, FAST_TRIG)
            for r in tl.static_range(R):
                kbase = b.to(tl.int64) * s_kb + t_last.to(tl.int64) * s_kt + r * s_kr + g.to(tl.int64) * s_kg
                mk = jm & (j < lim_ne)
                k0 = tl.load(k_ptr + kbase + c0, mask=mk, other=0.0).to(tl.float32)
                k1 = tl.load(k_ptr + kbase + c1, mask=mk, other=0.0).to(tl.float32)
                k0 += tl.load(kb_ptr + (h * R + r) * N + c0, mask=mk, other=0.0)
                k1 += tl.load(kb_ptr + (h * R + r) * N + c1, mask=mk, other=0.0)
                k0, k1 = _rotate(k0, k1, c, sn)
                orow = ((seq * R + r) * H + h) * N
                if HAS_INIT:
                    mi = jm & (j < lim_e)
                    k0 = tl.where(nonempty, k0, tl.load(k_in_ptr + orow + c0, mask=mi, other=0.0))
                    k1 = tl.where(nonempty, k1, tl.load(k_in_ptr + orow + c1, mask=mi, other=0.0))
                tl.store(k_out_ptr + orow + c0, k0, mask=jm)
                tl.store(k_out_ptr + orow + c1, k1, mask=jm)
