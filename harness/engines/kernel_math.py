"""float32 scalar arithmetic for the numba kernels (``kernels.py``), rounding as NumPy's ufuncs
round on this machine.

Importing this module imports numba and points its cache at ``kernel_choice.cache_dir()``;
nothing imports it unless a group takes the numba path (``kernel_choice.choose_kernel``).
The directory is set as ``numba.config.CACHE_DIR``, numba's own run-time setting, before any
kernel is decorated (numba fixes a function's cache location when it decorates it), not through
``os.environ``: no environment variable changes, and numba keeps a value set this way (it
re-reads its environment only when a ``NUMBA_*`` variable changes).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from harness.engines.kernel_choice import cache_dir

# Before the first @njit below: each decorated function fixes its cache location then.
numba.config.CACHE_DIR = str(cache_dir())

# Every kernel compiles with these: no fast-math (it would reassociate the sums whose order the
# kernels pin), and NumPy's error model (x/0 is inf or NaN, never an exception: a diverging member
# is data).
JIT = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)

f32 = np.float32
ZERO, ONE = f32(0.0), f32(1.0)
RELU, TANH, SIGMOID = 0, 1, 2
ACTIVATION_CODES = {"relu": RELU, "tanh": TANH, "sigmoid": SIGMOID}
SGD, ADAM, RMSPROP = 0, 1, 2
OPTIMIZER_CODES = {"sgd": SGD, "adam": ADAM, "rmsprop": RMSPROP}


@intrinsic
def fmaf(typingctx, a, b, c):
    """float32 a*b + c with one rounding (llvm.fma.f32, a vfmadd instruction): BLAS kernels
    accumulate with FMA, so an emulation of their sums must too."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return sig, codegen


@intrinsic
def pow2(typingctx, k):
    """2.0**k as a float64 for an integer -1022 <= k <= 1023, built from its bits: no call and no
    table, so the loops calling it stay vectorizable."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        bits = builder.shl(builder.add(args[0], ir.Constant(ir.IntType(64), 1023)), ir.Constant(ir.IntType(64), 52))
        return builder.bitcast(bits, ir.DoubleType())

    return sig, codegen


@intrinsic
def frexpf(typingctx, x):
    """(m, e) with x = m * 2**e and m in [0.5, 1), read from the bits of a positive normal
    float32 (AVX-512's getmant and getexp + 1, which np.log uses); other inputs give garbage."""
    sig = types.UniTuple(types.float32, 2)(types.float32)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        e = builder.sub(builder.and_(builder.lshr(bits, ir.Constant(i32, 23)), ir.Constant(i32, 0xFF)),
                        ir.Constant(i32, 126))
        m = builder.or_(builder.and_(bits, ir.Constant(i32, 0x7FFFFF)), ir.Constant(i32, 0x3F000000))
        return context.make_tuple(builder, signature.return_type,
                                  [builder.bitcast(m, ir.FloatType()), builder.sitofp(e, ir.FloatType())])

    return sig, codegen


# NumPy's float32 exp (loops_exponent_log.dispatch.c.src, simd_exp_FLOAT for AVX512F/AVX2):
# Cody-Waite reduction x = q*ln2 + r, a rational minimax approximation of e^r, then a scaling
# by 2^q. Its constants are below; the port equals np.exp bit for bit (tests/test_kernels.py
# checks millions of inputs), where numba's np.exp calls libm's expf and differs in ~40 % of
# last bits.
XMAX, XMIN = f32(88.72283935546875), f32(-103.97208404541015625)  # e^x overflows / underflows past these
LOG2E = f32(1.442695040888963407359924681001892137)
MAGIC = f32(12582912.0)  # 1.5 * 2^23: (v + MAGIC) - MAGIC rounds v to an integer
LN2_HI, LN2_LO = f32(-6.93145752e-1), f32(-1.42860677e-6)
P0, P1, P2 = f32(9.999999999980870924916e-01), f32(7.257664613233124478488e-01), f32(2.473615434895520810817e-01)
P3, P4, P5 = f32(5.114512081637298353406e-02), f32(6.757896990527504603057e-03), f32(5.082762527590693718096e-04)
Q0, Q1, Q2 = f32(1.0), f32(-2.742335390411667452936e-01), f32(2.159509375685829852307e-02)


@numba.njit(**JIT)
def np_expf(x):
    """np.exp of one float32, bit for bit (see above). Written without branches (the special
    cases are selected at the end) so that loops over it vectorize as NumPy's does."""
    xc = min(max(x, XMIN), XMAX)  # keeps 2^q finite whatever x is; the ends are patched below
    q = xc * LOG2E
    q = (q + MAGIC) - MAGIC
    r = fmaf(q, LN2_HI, xc)
    r = fmaf(q, LN2_LO, r)
    r = fmaf(q, ZERO, r)  # NumPy's third Cody-Waite term is zero for float32; kept for its rounding
    num = fmaf(fmaf(fmaf(fmaf(fmaf(P5, r, P4), r, P3), r, P2), r, P1), r, P0)
    den = fmaf(fmaf(Q2, r, Q1), r, Q0)
    # vscalefps scales by 2^q with a single rounding; num/den * 2^q is exact in float64, so one
    # rounding to float32 gives the same bits, subnormal results included.
    e = f32(np.float64(num / den) * pow2(np.int64(q)))
    e = f32(np.inf) if x >= XMAX else e
    e = ZERO if x <= XMIN else e
    return x if x != x else e


# NumPy's float32 log (the same file, simd_log_FLOAT): x = m 2^e with m in [0.5, 1), m doubled
# and e lowered when m <= sqrt(1/2), then log(1 + (m - 1)) as a ratio of two degree-5
# polynomials plus e ln 2. Equal to np.log bit for bit (tests/test_kernels.py), where numba's
# np.log calls libm's logf, one row at a time.
LOG_P = tuple(f32(c) for c in (0.0, 9.999999999999998702752e-01, 2.112677543073053063722e+00,
                               1.480000633576506585156e+00, 3.808837741388407920751e-01, 2.589979117907922693523e-02))
LOG_Q = tuple(f32(c) for c in (1.0, 2.612677543073109236779e+00, 2.453006071784736363091e+00,
                               9.864942958519418960339e-01, 1.546476374983906719538e-01, 5.875095403124574342950e-03))
LOGE2, SQRT1_2 = f32(0.693147180559945309417232121458176568), f32(0.707106781186547524400844362104849039)
TINY, TWO23 = f32(1.17549435e-38), f32(8388608.0)  # the smallest normal float32; 2^23
NAN, NEG_NAN = f32(np.nan), np.uint32(0xFFC00000).view(f32)  # NumPy's NaN and -NaN: the sign bit kept


@numba.njit(**JIT)
def np_logf(x):
    """np.log of one float32, bit for bit, branch-free like np_expf: a subnormal x is scaled by
    2^23 first (AVX-512's getexp and getmant read it exactly), and the special cases (NaN, x < 0,
    0, inf) are selected at the end."""
    sub = ZERO < x < TINY
    m, e = frexpf(x * TWO23 if sub else x)
    e = e - f32(23.0) if sub else e
    low = m <= SQRT1_2
    m = m + m if low else m
    e = e - ONE if low else e
    r = m - ONE
    num = fmaf(fmaf(fmaf(fmaf(fmaf(LOG_P[5], r, LOG_P[4]), r, LOG_P[3]), r, LOG_P[2]), r, LOG_P[1]), r, LOG_P[0])
    den = fmaf(fmaf(fmaf(fmaf(fmaf(LOG_Q[5], r, LOG_Q[4]), r, LOG_Q[3]), r, LOG_Q[2]), r, LOG_Q[1]), r, LOG_Q[0])
    v = fmaf(e, LOGE2, num / den)
    v = NAN if x != x else v
    v = NEG_NAN if x < ZERO else v
    v = -f32(np.inf) if x == ZERO else v
    return f32(np.inf) if x == f32(np.inf) else v


# tanh in float64, rounded once to float32: within one float32 ulp of the true value, as
# NumPy's own float32 tanh (an SVML-derived table of polynomials, not ported) is, so tanh
# networks agree with the NumPy path to float32 rounding, not bitwise. No libm call: libm's
# tanhf costs ~20 ns a unit and keeps every loop scalar.
#   tanh|z| = -u / (u + 2), u = expm1(-2|z|) = 2^k (expm1(r) + 1) - 1, y = -2|z| = k ln2 + r;
# expm1(r) by its Taylor series to r^10 (relative error < 2e-11 on |r| <= ln2/2), which keeps
# full relative accuracy as z -> 0, where 1 - e^y would cancel.
LN2_HI64, LN2_LO64 = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # ln 2 split (hi has 32 bits)
EXPM1_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(10, 1, -1))  # 1/10! .. 1/2!
TANH_ONE = 10.0  # tanh(10) = 1 - 4e-9 rounds to 1.0 in float32


@numba.njit(**JIT)
def tanh(z):
    y = -2.0 * min(abs(np.float64(z)), TANH_ONE)
    k = np.floor(y * 1.4426950408889634 + 0.5)
    r = (y - k * LN2_HI64) - k * LN2_LO64
    poly = 0.0
    for c in EXPM1_TAYLOR:
        poly = poly * r + c
    em1 = r + r * r * poly  # expm1(r)
    scale = pow2(np.int64(k))
    u = scale * em1 + (scale - 1.0)  # expm1(y); exact scaling, and k = 0 leaves expm1(r) untouched
    t = f32(math.copysign(u / (u + 2.0), z))  # tanh is odd; -0.0 stays -0.0
    return t if z == z else z  # NaN in, NaN out


@numba.njit(**JIT)
def relu(z):
    return z if (z >= ZERO or z != z) else ZERO  # np.maximum(z, 0): keeps NaN and -0.0


@numba.njit(**JIT)
def sigmoid(z):
    return ONE / (np_expf(-z) + ONE)  # as fused.activate: negative, exp, += 1, reciprocal


# dLoss/dz from a = activation(z) and d = dLoss/da, rounding as fused._activation_grad
# (TensorFlow's ReluGrad, TanhGrad, SigmoidGrad).

@numba.njit(**JIT)
def relu_grad(z, d):
    return d if z > ZERO else d * ZERO  # d * (z > 0): a NaN or inf d stays NaN, as in NumPy


@numba.njit(**JIT)
def tanh_grad(a, d):
    return (ONE - a * a) * d


@numba.njit(**JIT)
def sigmoid_grad(a, d):
    return ((ONE - a) * a) * d
