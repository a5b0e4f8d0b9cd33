# Type stub shared by every ISA kernel module (_kernels_baseline, _kernels_avx2,
# _kernels_avx512, _kernels_native): setup.py copies it next to each module.
# Kernels trust their inputs; call them through fastadam.functional.
import numpy as np
import numpy.typing as npt

ISA: str
OPENMP: bool
FAST_DIV: bool

def div_bc32(x: npt.NDArray[np.float32], out: npt.NDArray[np.float32],
             c: float) -> None: ...
def div_bc64(x: npt.NDArray[np.float64], out: npt.NDArray[np.float64],
             c: float) -> None: ...
def adam32(param: npt.NDArray[np.float32], grad: npt.NDArray[np.float32],
           exp_avg: npt.NDArray[np.float32], exp_avg_sq: npt.NDArray[np.float32],
           max_exp_avg_sq: npt.NDArray[np.float32] | None, neg_step_size: float,
           bc2_sqrt: float, sign: float, grad_scale: float, decay: float,
           weight_decay: float, c1: float, c2: float, beta2: float, eps: float,
           l2: bool, scaled: bool, n_threads: int) -> None: ...
def adam64(param: npt.NDArray[np.float64], grad: npt.NDArray[np.float64],
           exp_avg: npt.NDArray[np.float64], exp_avg_sq: npt.NDArray[np.float64],
           max_exp_avg_sq: npt.NDArray[np.float64] | None, neg_step_size: float,
           bc2_sqrt: float, sign: float, grad_scale: float, decay: float,
           weight_decay: float, c1: float, c2: float, beta2: float, eps: float,
           l2: bool, scaled: bool, n_threads: int) -> None: ...
def adam_multi32(params: npt.NDArray[np.int64], grads: npt.NDArray[np.int64],
                 exp_avgs: npt.NDArray[np.int64], exp_avg_sqs: npt.NDArray[np.int64],
                 max_exp_avg_sqs: npt.NDArray[np.int64], offsets: npt.NDArray[np.int64],
                 neg_step_sizes: npt.NDArray[np.float64], bc2_sqrts: npt.NDArray[np.float64],
                 sign: float, grad_scale: float, decay: float, weight_decay: float,
                 c1: float, c2: float, beta2: float, eps: float, l2: bool, scaled: bool,
                 n_threads: int) -> None: ...
def adam_multi64(params: npt.NDArray[np.int64], grads: npt.NDArray[np.int64],
                 exp_avgs: npt.NDArray[np.int64], exp_avg_sqs: npt.NDArray[np.int64],
                 max_exp_avg_sqs: npt.NDArray[np.int64], offsets: npt.NDArray[np.int64],
                 neg_step_sizes: npt.NDArray[np.float64], bc2_sqrts: npt.NDArray[np.float64],
                 sign: float, grad_scale: float, decay: float, weight_decay: float,
                 c1: float, c2: float, beta2: float, eps: float, l2: bool, scaled: bool,
                 n_threads: int) -> None: ...
def sumsq_multi32(ptrs: npt.NDArray[np.int64], offsets: npt.NDArray[np.int64],
                  n_threads: int) -> float: ...
def sumsq_multi64(ptrs: npt.NDArray[np.int64], offsets: npt.NDArray[np.int64],
                  n_threads: int) -> float: ...
