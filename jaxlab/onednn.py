"""oneDNN's convolutions, BatchNorm and matmuls as XLA:CPU operations.

XLA:CPU runs convolutions through Eigen; oneDNN, the library behind
PyTorch's CPU convolutions, runs this project's layers several times
faster (benchmarks/README.md has the figures). BatchNorm fused with the
ReLU after it (normalisation with given statistics, and the training
gradient) makes two passes over the activations where XLA's fusions make
five; its max-pooling keeps each window's maximum as it writes the result
and routes the gradient by it, where XLA makes one pass per window element.
In bfloat16, on CPUs with bfloat16 instructions (AVX512-BF16, AMX),
oneDNN's kernels are the fast ones and XLA's are not, dense layers
included. This module binds oneDNN's C API with ctypes and registers
ctypes callbacks as XLA FFI handlers: XLA hands them its own buffers, so
nothing is copied, and nothing needs compiling.

oneDNN comes from the `onednn-cpu-gomp` wheel (oneDNN 3.2, OpenMP threads;
Linux x86-64 only). `enabled()` says whether `jaxlab.ops` uses it: where it
did not load, or with JAXLAB_ONEDNN=0 in the environment (read when a step
is traced), every operation is XLA's. Arrays are float32 or bfloat16
(BatchNorm's statistics and parameters float32), NHWC inputs and HWIO
kernels, convolutions of stride 1, padding of zero or more. Not
differentiable twice and no `vmap` rule beyond a loop: `ops.conv2d`,
`ops.dense`, `ops.batch_norm` and `ops.max_pool` give first-order
gradients.
"""

import ctypes
import functools
import importlib.metadata
import os
import threading

import jax
import numpy as np

# --- oneDNN's C API (oneDNN 3.2, dnnl_types.h and dnnl_common_types.h) ---

_DNNL_BF16 = 2
_DNNL_F32 = 3
_DNNL_CPU = 1
_DNNL_STREAM_IN_ORDER = 1
_TAG_ANY = 1
_TAG_A = 2  # dnnl_a: a vector (the bias)
_TAG_NHWC = 22  # dnnl_acdb for dims [N, C, H, W]
_TAG_HWIO = 28  # dnnl_cdba for dims [O, I, H, W]
_FORWARD_TRAINING = 64
_BACKWARD = 128
_CONVOLUTION_DIRECT = 1
_POOLING_MAX = 0x1ff
_ELTWISE_RELU = 0x20
_QUERY_IMPL_INFO_STR = 8
_QUERY_WORKSPACE_MD = 135
_QUERY_SCRATCHPAD_MD = 136
_QUERY_EXEC_ARG_MD = 255
_SCRATCHPAD_MODE_USER = 1
_ARG_SRC = 1
_ARG_DST = 17
_ARG_WEIGHTS = 33
_ARG_BIAS = 41
_ARG_MEAN = 49
_ARG_VARIANCE = 50
_ARG_SCALE = 51
_ARG_SHIFT = 52
_ARG_WORKSPACE = 64
_ARG_SCRATCHPAD = 80
_ARG_DIFF_SRC = 129
_ARG_DIFF_DST = 145
_ARG_DIFF_WEIGHTS = 161
_ARG_DIFF_BIAS = 169
_ARG_DIFF_SCALE = 255
_ARG_DIFF_SHIFT = 256
# dnnl_normalization_flags_t
_USE_GLOBAL_STATS = 0x1
_USE_SCALE = 0x2
_USE_SHIFT = 0x4
_FUSE_NORM_RELU = 0x8
_MAX_NDIMS = 12

_Dims = ctypes.c_int64 * _MAX_NDIMS


class _ExecArg(ctypes.Structure):
  _fields_ = [('arg', ctypes.c_int), ('memory', ctypes.c_void_p)]


# --- XLA's FFI C API (jaxlib/include/xla/ffi/api/c_api.h, API 0.3) ---

_FFI_API_VERSION = (0, 3)
_FFI_EXTENSION_METADATA = 1
_FFI_DATA_TYPE_U8 = 6
_FFI_DATA_TYPE_F32 = 11
_FFI_DATA_TYPE_BF16 = 16
_FFI_ERROR_INTERNAL = 13


class _FfiExtensionBase(ctypes.Structure):
  pass


_FfiExtensionBase._fields_ = [  # pylint: disable=protected-access
    ('struct_size', ctypes.c_size_t), ('type', ctypes.c_int),
    ('next', ctypes.POINTER(_FfiExtensionBase))]


class _FfiApiVersion(ctypes.Structure):
  _fields_ = [('struct_size', ctypes.c_size_t),
              ('extension_start', ctypes.c_void_p),
              ('major_version', ctypes.c_int),
              ('minor_version', ctypes.c_int)]


class _FfiMetadata(ctypes.Structure):
  _fields_ = [('struct_size', ctypes.c_size_t),
              ('api_version', _FfiApiVersion),
              ('traits', ctypes.c_uint32),
              ('state_type_id', ctypes.c_int64)]


class _FfiMetadataExtension(ctypes.Structure):
  _fields_ = [('extension_base', _FfiExtensionBase),
              ('metadata', ctypes.POINTER(_FfiMetadata))]


class _FfiBuffer(ctypes.Structure):
  _fields_ = [('struct_size', ctypes.c_size_t),
              ('extension_start', ctypes.c_void_p),
              ('dtype', ctypes.c_int),
              ('data', ctypes.c_void_p),
              ('rank', ctypes.c_int64),
              ('dims', ctypes.POINTER(ctypes.c_int64))]


class _FfiList(ctypes.Structure):
  """XLA_FFI_Args and XLA_FFI_Rets: `size` buffers; XLA_FFI_Attrs adds the
  attribute names."""
  _fields_ = [('struct_size', ctypes.c_size_t),
              ('extension_start', ctypes.c_void_p),
              ('size', ctypes.c_int64),
              ('types', ctypes.POINTER(ctypes.c_int)),
              ('items', ctypes.POINTER(ctypes.c_void_p))]


class _FfiAttrs(ctypes.Structure):
  _fields_ = _FfiList._fields_[:4] + [  # pylint: disable=protected-access
      ('names', ctypes.c_void_p), ('items', ctypes.POINTER(ctypes.c_void_p))]


class _FfiArray(ctypes.Structure):
  _fields_ = [('dtype', ctypes.c_int), ('size', ctypes.c_size_t),
              ('data', ctypes.c_void_p)]


class _FfiCallFrame(ctypes.Structure):
  _fields_ = [('struct_size', ctypes.c_size_t),
              ('extension_start', ctypes.POINTER(_FfiExtensionBase)),
              ('api', ctypes.c_void_p),
              ('ctx', ctypes.c_void_p),
              ('stage', ctypes.c_int),
              ('args', _FfiList),
              ('rets', _FfiList),
              ('attrs', _FfiAttrs),
              ('future', ctypes.c_void_p)]


class _FfiErrorCreateArgs(ctypes.Structure):
  _fields_ = [('struct_size', ctypes.c_size_t),
              ('extension_start', ctypes.c_void_p),
              ('message', ctypes.c_char_p),
              ('errc', ctypes.c_int)]


_FfiErrorCreate = ctypes.CFUNCTYPE(ctypes.c_void_p,
                                   ctypes.POINTER(_FfiErrorCreateArgs))


class _FfiApiHead(ctypes.Structure):
  """XLA_FFI_Api up to its first function, XLA_FFI_Error_Create."""
  _fields_ = [('struct_size', ctypes.c_size_t),
              ('extension_start', ctypes.c_void_p),
              ('api_version', _FfiApiVersion),
              ('internal_api', ctypes.c_void_p),
              ('error_create', _FfiErrorCreate)]


_FfiHandler = ctypes.CFUNCTYPE(ctypes.c_void_p,
                               ctypes.POINTER(_FfiCallFrame))


@functools.cache
def _library():
  """oneDNN's shared library from the onednn-cpu-gomp wheel, or None."""
  try:
    files = importlib.metadata.files('onednn-cpu-gomp') or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in files:
    if file.name == 'libdnnl.so.3':
      try:
        lib = ctypes.CDLL(str(file.locate()))
      except OSError:
        return None
      lib.dnnl_primitive_desc_query_md.restype = ctypes.c_void_p
      lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
      lib.dnnl_post_ops_append_eltwise.argtypes = (
          ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_float)
      return lib
  return None


def _check(status: int, call: str) -> None:
  if status != 0:
    raise RuntimeError(f'oneDNN {call} failed with dnnl_status_t {status}')


@functools.cache
def _engine() -> ctypes.c_void_p:
  engine = ctypes.c_void_p()
  _check(_library().dnnl_engine_create(ctypes.byref(engine), _DNNL_CPU, 0),
         'dnnl_engine_create')
  return engine


@functools.cache
def _stream() -> ctypes.c_void_p:
  """The one oneDNN stream: convolutions run one at a time (see
  `_one_at_a_time`). A thread-local one would not do: XLA calls from its own
  threads, whose Python thread state (and thread-locals) last one call."""
  stream = ctypes.c_void_p()
  _check(_library().dnnl_stream_create(ctypes.byref(stream), _engine(),
                                       _DNNL_STREAM_IN_ORDER),
         'dnnl_stream_create')
  return stream


def conv_output_shape(x_shape, kernel_shape, padding):
  """The NHWC shape of the stride-1 convolution of `x_shape` (NHWC) with
  `kernel_shape` (HWIO), `padding` ((top, bottom), (left, right))."""
  b, height, width, _ = x_shape
  kh, kw, _, cout = kernel_shape
  (top, bottom), (left, right) = padding
  return (b, height + top + bottom - kh + 1, width + left + right - kw + 1,
          cout)


def _memory_desc(dims, tag: int, data_type: int = _DNNL_F32
                 ) -> ctypes.c_void_p:
  desc = ctypes.c_void_p()
  _check(_library().dnnl_memory_desc_create_with_tag(
      ctypes.byref(desc), len(dims), _Dims(*dims), data_type, tag),
         'dnnl_memory_desc_create_with_tag')
  return desc


@functools.cache
def _user_scratchpad_attr(relu_after: bool = False) -> ctypes.c_void_p:
  """Primitive attributes: the caller passes each call's scratchpad, and with
  `relu_after` the primitive applies max(0, .) to its result as it writes it
  (a post-op).

  oneDNN's own (library) scratchpad is shared by concurrent calls of one
  primitive; the kernel gradient keeps its threads' barrier there, and two
  devices' steps running it at once (pmap over CPU devices) deadlocked.
  """
  lib = _library()
  attr = ctypes.c_void_p()
  _check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)),
         'dnnl_primitive_attr_create')
  _check(lib.dnnl_primitive_attr_set_scratchpad_mode(
      attr, _SCRATCHPAD_MODE_USER), 'dnnl_primitive_attr_set_scratchpad_mode')
  if relu_after:
    post_ops = ctypes.c_void_p()
    _check(lib.dnnl_post_ops_create(ctypes.byref(post_ops)),
           'dnnl_post_ops_create')
    _check(lib.dnnl_post_ops_append_eltwise(post_ops, _ELTWISE_RELU, 0.0,
                                            0.0),
           'dnnl_post_ops_append_eltwise')
    _check(lib.dnnl_primitive_attr_set_post_ops(attr, post_ops),
           'dnnl_primitive_attr_set_post_ops')
  return attr


def _primitive(primitive_desc) -> ctypes.c_void_p:
  primitive = ctypes.c_void_p()
  _check(_library().dnnl_primitive_create(ctypes.byref(primitive),
                                          primitive_desc),
         'dnnl_primitive_create')
  return primitive


class _Scratchpad:
  """The size and layout of a primitive's scratchpad."""

  def __init__(self, primitive_desc):
    lib = _library()
    self.desc = ctypes.c_void_p(lib.dnnl_primitive_desc_query_md(
        primitive_desc, _QUERY_SCRATCHPAD_MD, 0))
    self.size = lib.dnnl_memory_desc_get_size(self.desc)


def _aligned_buffer(size: int):
  """`size` bytes aligned to 64 (oneDNN's blocked layouts want it): the
  numpy array that owns them, and their address."""
  buffer = np.empty(size + 64, np.uint8)
  return buffer, buffer.ctypes.data + (-buffer.ctypes.data) % 64


def _execute(primitive, scratchpad: _Scratchpad, args) -> None:
  """Runs `primitive` on {argument: (memory desc, data pointer)}, with a
  fresh scratchpad."""
  lib = _library()
  scratchpad_buffer = None
  if scratchpad.size:
    scratchpad_buffer, scratchpad_data = _aligned_buffer(scratchpad.size)
    args = {**args, _ARG_SCRATCHPAD: (scratchpad.desc, scratchpad_data)}
  memories = []
  try:
    for arg, (desc, data) in args.items():
      memory = ctypes.c_void_p()
      _check(lib.dnnl_memory_create(ctypes.byref(memory), desc, _engine(),
                                    ctypes.c_void_p(data)),
             'dnnl_memory_create')
      memories.append((arg, memory))
    exec_args = (_ExecArg * len(memories))(
        *[_ExecArg(arg, memory) for arg, memory in memories])
    stream = _stream()
    _check(lib.dnnl_primitive_execute(primitive, stream, len(memories),
                                      exec_args), 'dnnl_primitive_execute')
    _check(lib.dnnl_stream_wait(stream), 'dnnl_stream_wait')
  finally:
    for _, memory in memories:
      lib.dnnl_memory_destroy(memory)
    del scratchpad_buffer  # Freed only once the primitive has run.


class _Reorder:
  """Copies between two layouts of the same array."""

  def __init__(self, source, destination):
    self.primitive_desc = ctypes.c_void_p()
    _check(_library().dnnl_reorder_primitive_desc_create(
        ctypes.byref(self.primitive_desc), source, _engine(), destination,
        _engine(), _user_scratchpad_attr()),
           'dnnl_reorder_primitive_desc_create')
    self.scratchpad = _Scratchpad(self.primitive_desc)
    self.primitive = _primitive(self.primitive_desc)
    self.source, self.destination = source, destination

  def __call__(self, source_data: int, destination_data: int) -> None:
    _execute(self.primitive, self.scratchpad,
             {_ARG_SRC: (self.source, source_data),
              _ARG_DST: (self.destination, destination_data)})


FORWARD, INPUT_GRAD, KERNEL_GRAD = 'forward', 'input_grad', 'kernel_grad'
FORWARD_RELU = 'forward_relu'  # The forward pass, then max(0, .).
CONVOLUTION_KINDS = (FORWARD, FORWARD_RELU, INPUT_GRAD, KERNEL_GRAD)
BATCH_NORM_RELU, BATCH_NORM_RELU_GRAD = 'batch_norm_relu', 'batch_norm_relu_grad'
DENSE, DENSE_INPUT_GRAD, DENSE_KERNEL_GRAD = (
    'dense', 'dense_input_grad', 'dense_kernel_grad')
DENSE_KINDS = (DENSE, DENSE_INPUT_GRAD, DENSE_KERNEL_GRAD)
MAX_POOL, MAX_POOL_GRAD = 'max_pool', 'max_pool_grad'


class _Operation:
  """A oneDNN primitive built for one kind of call and one set of shapes."""
  primitive_desc: ctypes.c_void_p

  def implementation(self) -> str:
    """The name of the oneDNN implementation chosen, e.g. 'jit:avx512_core'."""
    name = ctypes.c_char_p()
    _check(_library().dnnl_primitive_desc_query(
        self.primitive_desc, _QUERY_IMPL_INFO_STR, 0, ctypes.byref(name)),
           'dnnl_primitive_desc_query')
    return name.value.decode()


class _OperationWithWorkspace(_Operation):
  """An operation whose forward pass leaves its gradient a workspace."""

  def _build(self, kind: str) -> None:
    """The primitive for `self.primitive_desc`, and its workspace's layout
    and size."""
    lib = _library()
    self.kind = kind
    self.workspace = ctypes.c_void_p(lib.dnnl_primitive_desc_query_md(
        self.primitive_desc, _QUERY_WORKSPACE_MD, 0))
    self.workspace_size = lib.dnnl_memory_desc_get_size(self.workspace)
    self.primitive = _primitive(self.primitive_desc)
    self.scratchpad = _Scratchpad(self.primitive_desc)


class _Convolution(_Operation):
  """One oneDNN convolution primitive, for one kind and one set of shapes.

  The activations stay in XLA's NHWC layout. The kernel goes through the
  layout oneDNN picks for it (blocked over channels), reordered from or to
  XLA's HWIO on every call: kernels are small.
  """

  def __init__(self, kind: str, x_shape, kernel_shape, padding,
               dtype: str = 'float32'):
    b, height, width, cin = x_shape
    kh, kw, _, cout = kernel_shape
    (top, bottom), (left, right) = padding
    _, y_height, y_width, _ = conv_output_shape(x_shape, kernel_shape,
                                                padding)
    # Every operand and result in `dtype`; in bfloat16, oneDNN accumulates
    # in float32 and rounds once at the end, the kernel gradient included.
    data_type = _DNNL_DATA_TYPES[dtype]
    self.x = _memory_desc((b, cin, height, width), _TAG_NHWC, data_type)
    self.y = _memory_desc((b, cout, y_height, y_width), _TAG_NHWC, data_type)
    self.kernel = _memory_desc((cout, cin, kh, kw), _TAG_HWIO, data_type)
    any_kernel = _memory_desc((cout, cin, kh, kw), _TAG_ANY, data_type)
    # The forward pass adds the bias as it writes y; the kernel gradient
    # computes the bias's in the same pass over dy.
    self.bias = (None if kind == INPUT_GRAD else
                 _memory_desc((cout,), _TAG_A, data_type))
    geometry = (_Dims(1, 1), _Dims(0, 0), _Dims(top, left),
                _Dims(bottom, right))
    lib = _library()
    forward = ctypes.c_void_p()
    _check(lib.dnnl_convolution_forward_primitive_desc_create(
        ctypes.byref(forward), _engine(), _FORWARD_TRAINING,
        _CONVOLUTION_DIRECT, self.x, any_kernel, self.bias, self.y,
        *geometry, _user_scratchpad_attr(relu_after=kind == FORWARD_RELU)),
           'dnnl_convolution_forward_primitive_desc_create')
    if kind in (FORWARD, FORWARD_RELU):
      self.primitive_desc = forward
      kernel_arg = _ARG_WEIGHTS
    elif kind == INPUT_GRAD:
      self.primitive_desc = ctypes.c_void_p()
      _check(lib.dnnl_convolution_backward_data_primitive_desc_create(
          ctypes.byref(self.primitive_desc), _engine(), _CONVOLUTION_DIRECT,
          self.x, any_kernel, self.y, *geometry, forward,
          _user_scratchpad_attr()),
             'dnnl_convolution_backward_data_primitive_desc_create')
      kernel_arg = _ARG_WEIGHTS
    else:
      self.primitive_desc = ctypes.c_void_p()
      _check(lib.dnnl_convolution_backward_weights_primitive_desc_create(
          ctypes.byref(self.primitive_desc), _engine(), _CONVOLUTION_DIRECT,
          self.x, any_kernel, self.bias, self.y, *geometry, forward,
          _user_scratchpad_attr()),
             'dnnl_convolution_backward_weights_primitive_desc_create')
      kernel_arg = _ARG_DIFF_WEIGHTS
    self.kind = kind
    self.primitive = _primitive(self.primitive_desc)
    self.blocked_kernel = ctypes.c_void_p(lib.dnnl_primitive_desc_query_md(
        self.primitive_desc, _QUERY_EXEC_ARG_MD, kernel_arg))
    self.blocked_kernel_size = lib.dnnl_memory_desc_get_size(
        self.blocked_kernel)
    self.scratchpad = _Scratchpad(self.primitive_desc)
    if kind == KERNEL_GRAD:
      self.reorder = _Reorder(self.blocked_kernel, self.kernel)
    else:
      self.reorder = _Reorder(self.kernel, self.blocked_kernel)

  def __call__(self, *data: int) -> None:
    """forward: (x, kernel, bias) -> y; input_grad: (dy, kernel) -> dx;
    kernel_grad: (x, dy) -> (dkernel, dbias); all data pointers."""
    with _one_at_a_time:
      self._run(*data)

  def _run(self, *data: int) -> None:
    blocked, blocked_data = _aligned_buffer(self.blocked_kernel_size)
    kernel = (self.blocked_kernel, blocked_data)
    if self.kind in (FORWARD, FORWARD_RELU):
      x, user_kernel, bias, y = data
      self.reorder(user_kernel, blocked_data)
      args = {_ARG_SRC: (self.x, x), _ARG_WEIGHTS: kernel,
              _ARG_BIAS: (self.bias, bias), _ARG_DST: (self.y, y)}
    elif self.kind == INPUT_GRAD:
      dy, user_kernel, dx = data
      self.reorder(user_kernel, blocked_data)
      args = {_ARG_DIFF_DST: (self.y, dy), _ARG_WEIGHTS: kernel,
              _ARG_DIFF_SRC: (self.x, dx)}
    else:
      x, dy, dkernel, dbias = data
      args = {_ARG_SRC: (self.x, x), _ARG_DIFF_DST: (self.y, dy),
              _ARG_DIFF_WEIGHTS: kernel, _ARG_DIFF_BIAS: (self.bias, dbias)}
    _execute(self.primitive, self.scratchpad, args)
    if self.kind == KERNEL_GRAD:
      self.reorder(blocked_data, dkernel)
    del blocked


class _BatchNormReLU(_OperationWithWorkspace):
  """BatchNorm of NHWC x with statistics given, then a ReLU, in training.

  batch_norm_relu: (x, mean, var, scale, bias) -> (y, workspace): y =
  max(0, (x - mean) / sqrt(var) * scale + bias); the workspace keeps which
  elements passed the ReLU. batch_norm_relu_grad: (x, mean, var, scale,
  workspace, dy) -> (dx, dscale, dbias), the gradients through the batch's
  statistics too (the mean and variance of x over all axes but the last).
  `var` includes BatchNorm's epsilon (oneDNN's is 0), so that one primitive
  serves every epsilon. x, y, dy and dx are float32 or bfloat16; the
  per-channel vectors are float32 (oneDNN computes in float32 either way).
  """

  def __init__(self, kind: str, x_shape, dtype: str = 'float32'):
    b, height, width, channels = x_shape
    self.x = _memory_desc((b, channels, height, width), _TAG_NHWC,
                          _DNNL_DATA_TYPES[dtype])
    self.vector = _memory_desc((channels,), _TAG_A)
    flags = _USE_SCALE | _USE_SHIFT | _FUSE_NORM_RELU
    lib = _library()
    # The forward pass normalises with the statistics it is given (the
    # caller computes them); the gradient takes them too, and
    # differentiates through them.
    forward = ctypes.c_void_p()
    _check(lib.dnnl_batch_normalization_forward_primitive_desc_create(
        ctypes.byref(forward), _engine(), _FORWARD_TRAINING, self.x, self.x,
        ctypes.c_float(0.0), flags | _USE_GLOBAL_STATS,
        _user_scratchpad_attr()),
           'dnnl_batch_normalization_forward_primitive_desc_create')
    if kind == BATCH_NORM_RELU:
      self.primitive_desc = forward
    else:
      self.primitive_desc = ctypes.c_void_p()
      _check(lib.dnnl_batch_normalization_backward_primitive_desc_create(
          ctypes.byref(self.primitive_desc), _engine(), _BACKWARD, self.x,
          self.x, self.x, ctypes.c_float(0.0), flags, forward,
          _user_scratchpad_attr()),
             'dnnl_batch_normalization_backward_primitive_desc_create')
    self._build(kind)

  def __call__(self, *data: int) -> None:
    """Operands then results, as data pointers, in the order above."""
    vector = lambda pointer: (self.vector, pointer)
    if self.kind == BATCH_NORM_RELU:
      x, mean, var, scale, bias, y, workspace = data
      args = {_ARG_SRC: (self.x, x), _ARG_SHIFT: vector(bias),
              _ARG_DST: (self.x, y)}
    else:
      x, mean, var, scale, workspace, dy, dx, dscale, dbias = data
      args = {_ARG_SRC: (self.x, x), _ARG_DIFF_DST: (self.x, dy),
              _ARG_DIFF_SRC: (self.x, dx), _ARG_DIFF_SCALE: vector(dscale),
              _ARG_DIFF_SHIFT: vector(dbias)}
    args.update({_ARG_MEAN: vector(mean), _ARG_VARIANCE: vector(var),
                 _ARG_SCALE: vector(scale),
                 _ARG_WORKSPACE: (self.workspace, workspace)})
    with _one_at_a_time:
      _execute(self.primitive, self.scratchpad, args)


class _MaxPool(_OperationWithWorkspace):
  """Max-pooling of NHWC x over k x k windows with a stride and padding.

  max_pool: x -> (y, workspace), the workspace keeping each window's
  maximum's position (the first in row-major order, as XLA's gradient
  takes). max_pool_grad: (workspace, dy) -> dx, each window's dy added to
  that position. Padding is never a window's maximum (XLA's -inf); rows
  and columns past the last whole window are left out, as in XLA.
  """

  def __init__(self, kind: str, x_shape, k: int, stride: int, padding: int,
               dtype: str = 'float32'):
    b, height, width, channels = x_shape
    y_height, y_width = (pooled_size(n, k, stride, padding)
                         for n in (height, width))
    data_type = _DNNL_DATA_TYPES[dtype]
    self.x = _memory_desc((b, channels, height, width), _TAG_NHWC, data_type)
    self.y = _memory_desc((b, channels, y_height, y_width), _TAG_NHWC,
                          data_type)
    # oneDNN's right padding: what the last window reaches past the input
    # (negative where rows are left out).
    geometry = (_Dims(stride, stride), _Dims(k, k), _Dims(0, 0),
                _Dims(padding, padding),
                _Dims((y_height - 1) * stride + k - height - padding,
                      (y_width - 1) * stride + k - width - padding))
    lib = _library()
    forward = ctypes.c_void_p()
    _check(lib.dnnl_pooling_forward_primitive_desc_create(
        ctypes.byref(forward), _engine(), _FORWARD_TRAINING, _POOLING_MAX,
        self.x, self.y, *geometry, _user_scratchpad_attr()),
           'dnnl_pooling_forward_primitive_desc_create')
    if kind == MAX_POOL:
      self.primitive_desc = forward
    else:
      self.primitive_desc = ctypes.c_void_p()
      _check(lib.dnnl_pooling_backward_primitive_desc_create(
          ctypes.byref(self.primitive_desc), _engine(), _POOLING_MAX, self.x,
          self.y, *geometry, forward, _user_scratchpad_attr()),
             'dnnl_pooling_backward_primitive_desc_create')
    self._build(kind)

  def __call__(self, *data: int) -> None:
    """Operands then results, as data pointers, in the order above."""
    if self.kind == MAX_POOL:
      x, y, workspace = data
      args = {_ARG_SRC: (self.x, x), _ARG_DST: (self.y, y)}
    else:
      workspace, dy, dx = data
      args = {_ARG_DIFF_DST: (self.y, dy), _ARG_DIFF_SRC: (self.x, dx)}
    args[_ARG_WORKSPACE] = (self.workspace, workspace)
    with _one_at_a_time:
      _execute(self.primitive, self.scratchpad, args)


def pooled_size(n: int, k: int, stride: int, padding: int) -> int:
  """The number of whole k-windows, `stride` apart, along an axis of n
  padded by `padding` on each side."""
  return (n + 2 * padding - k) // stride + 1


def _matrix_desc(rows: int, cols: int, transposed: bool,
                 data_type: int) -> ctypes.c_void_p:
  """A [rows, cols] matrix stored row-major, or (`transposed`) the
  transpose of a row-major [cols, rows] one: no copy either way."""
  strides = (1, rows) if transposed else (cols, 1)
  desc = ctypes.c_void_p()
  _check(_library().dnnl_memory_desc_create_with_strides(
      ctypes.byref(desc), 2, _Dims(rows, cols), data_type, _Dims(*strides)),
         'dnnl_memory_desc_create_with_strides')
  return desc


class _Dense(_Operation):
  """One oneDNN matmul for a dense layer [batch, in] @ [in, out]: its
  forward pass (x, kernel, bias) -> y, input gradient (dy, kernel) -> dx =
  dy @ kernel.T and kernel gradient (x, dy) -> dkernel = x.T @ dy. The
  transposes are strides over XLA's row-major buffers.

  In bfloat16 (operands and result), oneDNN accumulates in float32 and
  rounds once, as its mixed-precision training does.
  """

  def __init__(self, kind: str, batch: int, inputs: int, outputs: int,
               dtype: str = 'float32'):
    data_type = _DNNL_DATA_TYPES[dtype]
    m, k, n, transpose_a, transpose_b = {
        DENSE: (batch, inputs, outputs, False, False),
        DENSE_INPUT_GRAD: (batch, outputs, inputs, False, True),
        DENSE_KERNEL_GRAD: (inputs, batch, outputs, True, False)}[kind]
    self.a = _matrix_desc(m, k, transpose_a, data_type)
    self.b = _matrix_desc(k, n, transpose_b, data_type)
    self.c = _matrix_desc(m, n, False, data_type)
    self.bias = (_matrix_desc(1, n, False, data_type) if kind == DENSE
                 else None)
    self.kind = kind
    self.primitive_desc = ctypes.c_void_p()
    _check(_library().dnnl_matmul_primitive_desc_create(
        ctypes.byref(self.primitive_desc), _engine(), self.a, self.b,
        self.bias, self.c, _user_scratchpad_attr()),
           'dnnl_matmul_primitive_desc_create')
    self.primitive = _primitive(self.primitive_desc)
    self.scratchpad = _Scratchpad(self.primitive_desc)

  def __call__(self, *data: int) -> None:
    """(a, b[, bias], c) as data pointers, in the order above."""
    a, b, *bias, c = data
    args = {_ARG_SRC: (self.a, a), _ARG_WEIGHTS: (self.b, b),
            _ARG_DST: (self.c, c)}
    if bias:
      args[_ARG_BIAS] = (self.bias, bias[0])
    with _one_at_a_time:
      _execute(self.primitive, self.scratchpad, args)


_operations: dict = {}
# One operation runs at a time: each already uses every core (OpenMP), and
# XLA runs independent operations at once (an input and a kernel gradient).
_one_at_a_time = threading.Lock()
_operations_lock = threading.Lock()


def _operation(cls, *key):
  """The `cls(*key)` built for the first call with `key`, reused after."""
  with _operations_lock:
    if (cls, key) not in _operations:
      _operations[cls, key] = cls(*key)
    return _operations[cls, key]


def _convolution(kind, x_shape, kernel_shape, padding,
                 dtype: str = 'float32') -> _Convolution:
  return _operation(_Convolution, kind, x_shape, kernel_shape, padding, dtype)


def _dense(kind, batch, inputs, outputs, dtype='float32') -> _Dense:
  return _operation(_Dense, kind, batch, inputs, outputs, dtype)


def _batch_norm_relu(kind, x_shape, dtype='float32') -> _BatchNormReLU:
  return _operation(_BatchNormReLU, kind, x_shape, dtype)


def _max_pool_op(kind, x_shape, k, stride, padding, dtype='float32'
                 ) -> _MaxPool:
  return _operation(_MaxPool, kind, x_shape, k, stride, padding, dtype)


def _buffer(pointer: int, dtype: int):
  buffer = ctypes.cast(pointer, ctypes.POINTER(_FfiBuffer)).contents
  if buffer.dtype != dtype:
    raise ValueError(f'oneDNN operation: expected XLA FFI data type {dtype}, '
                     f'got {buffer.dtype} (float32 or bfloat16 throughout; '
                     'uint8 workspaces)')
  return buffer.data, tuple(buffer.dims[i] for i in range(buffer.rank))


def _buffers(items, dtypes):
  """The (data, shape) of FFI buffers `items`, item i of XLA FFI data type
  dtypes[i]."""
  return [_buffer(items[i], dtype) for i, dtype in enumerate(dtypes)]


def _dtype_of(pointer: int) -> int:
  """The XLA FFI data type of a buffer that is float32 or bfloat16."""
  dtype = ctypes.cast(pointer, ctypes.POINTER(_FfiBuffer)).contents.dtype
  if dtype not in _FFI_DTYPE_NAMES:
    raise ValueError(f'oneDNN operation: got XLA FFI data type {dtype}, '
                     'expected float32 or bfloat16 throughout')
  return dtype


def _buffers_of_one_dtype(frame: _FfiCallFrame):
  """(dtype, operands, results) of a call whose buffers all have the first
  operand's dtype (float32 or bfloat16): convolutions and matmuls."""
  dtype = _dtype_of(frame.args.items[0])
  return (dtype, _buffers(frame.args.items, [dtype] * frame.args.size),
          _buffers(frame.rets.items, [dtype] * frame.rets.size))


def _run_batch_norm_relu(kind: str, frame: _FfiCallFrame) -> None:
  """Operands and results as `_BatchNormReLU` lists them: x, y, dy and dx
  in x's dtype, the workspace uint8, the rest float32."""
  x = _dtype_of(frame.args.items[0])
  f32, u8 = _FFI_DATA_TYPE_F32, _FFI_DATA_TYPE_U8
  if kind == BATCH_NORM_RELU:
    arg_types, ret_types = (x, f32, f32, f32, f32), (x, u8)
  else:
    arg_types, ret_types = (x, f32, f32, f32, u8, x), (x, f32, f32)
  args = _buffers(frame.args.items, arg_types)
  rets = _buffers(frame.rets.items, ret_types)
  _batch_norm_relu(kind, args[0][1], _FFI_DTYPE_NAMES[x])(
      *(data for data, _ in args + rets))


def _int_attributes(frame: _FfiCallFrame, count: int) -> list[int]:
  """The first attribute, an int64 array of `count` values."""
  array = ctypes.cast(frame.attrs.items[0],
                      ctypes.POINTER(_FfiArray)).contents
  return ctypes.cast(array.data, ctypes.POINTER(ctypes.c_int64))[:count]


def _run_max_pool(kind: str, frame: _FfiCallFrame) -> None:
  """Operands and results as `_MaxPool` lists them (x, y, dy and dx in one
  dtype, the workspace uint8), and the attribute `window` (int64 [k,
  stride, padding])."""
  u8 = _FFI_DATA_TYPE_U8
  if kind == MAX_POOL:
    x = _dtype_of(frame.args.items[0])
    arg_types, ret_types = (x,), (x, u8)
  else:
    x = _dtype_of(frame.args.items[1])
    arg_types, ret_types = (u8, x), (x,)
  args = _buffers(frame.args.items, arg_types)
  rets = _buffers(frame.rets.items, ret_types)
  x_shape = args[0][1] if kind == MAX_POOL else rets[0][1]
  k, stride, padding = _int_attributes(frame, 3)
  _max_pool_op(kind, x_shape, k, stride, padding, _FFI_DTYPE_NAMES[x])(
      *(data for data, _ in args + rets))


def _run_convolution(kind: str, frame: _FfiCallFrame) -> None:
  """One call: operands and results as `_Convolution` lists them, and the
  attribute `padding` (int64 [top, bottom, left, right])."""
  dtype, operands, results = _buffers_of_one_dtype(frame)
  (first, first_shape), (second, second_shape) = operands[:2]
  result_shape = results[0][1]
  top, bottom, left, right = _int_attributes(frame, 4)
  x_shape, kernel_shape = {
      FORWARD: (first_shape, second_shape),
      FORWARD_RELU: (first_shape, second_shape),
      INPUT_GRAD: (result_shape, second_shape),
      KERNEL_GRAD: (first_shape, result_shape)}[kind]
  convolution = _convolution(kind, x_shape, kernel_shape,
                             ((top, bottom), (left, right)),
                             _FFI_DTYPE_NAMES[dtype])
  convolution(*(data for data, _ in operands + results))


def _run_dense(kind: str, frame: _FfiCallFrame) -> None:
  """One call: operands and results as `_Dense` lists them."""
  dtype, operands, results = _buffers_of_one_dtype(frame)
  (_, first), (_, second) = operands[:2]
  batch, inputs, outputs = {
      DENSE: (first[0], first[1], second[1]),
      DENSE_INPUT_GRAD: (first[0], second[0], second[1]),
      DENSE_KERNEL_GRAD: (first[0], first[1], second[1])}[kind]
  _dense(kind, batch, inputs, outputs, _FFI_DTYPE_NAMES[dtype])(
      *(data for data, _ in operands + results))


def _error(frame: _FfiCallFrame, message: str) -> int:
  api = ctypes.cast(frame.api, ctypes.POINTER(_FfiApiHead)).contents
  args = _FfiErrorCreateArgs(ctypes.sizeof(_FfiErrorCreateArgs), None,
                             message.encode(), _FFI_ERROR_INTERNAL)
  return api.error_create(ctypes.byref(args))


def _handler(kind: str):
  """The XLA FFI handler (a C function pointer) that runs `kind`."""

  def handle(frame_pointer):
    frame = frame_pointer.contents
    try:
      extension = frame.extension_start
      if extension and extension.contents.type == _FFI_EXTENSION_METADATA:
        # XLA asks which FFI version the handler speaks before it registers.
        metadata = ctypes.cast(extension, ctypes.POINTER(
            _FfiMetadataExtension)).contents.metadata.contents
        version = metadata.api_version
        version.major_version, version.minor_version = _FFI_API_VERSION
        metadata.traits = 0
        return None
      _RUNNERS[kind](kind, frame)
    except BaseException as e:  # pylint: disable=broad-exception-caught
      # Nothing may cross into XLA (a KeyboardInterrupt included, which
      # would leave the returned error undefined); XLA reports the error.
      return _error(frame, f'jaxlab oneDNN {kind}: '
                           f'{type(e).__name__}: {e}')
    return None

  return _FfiHandler(handle)


_DNNL_DATA_TYPES = {'float32': _DNNL_F32, 'bfloat16': _DNNL_BF16}
_FFI_DTYPE_NAMES = {_FFI_DATA_TYPE_F32: 'float32',
                    _FFI_DATA_TYPE_BF16: 'bfloat16'}
_RUNNERS = {**dict.fromkeys(CONVOLUTION_KINDS, _run_convolution),
            **dict.fromkeys(DENSE_KINDS, _run_dense),
            BATCH_NORM_RELU: _run_batch_norm_relu,
            BATCH_NORM_RELU_GRAD: _run_batch_norm_relu,
            MAX_POOL: _run_max_pool, MAX_POOL_GRAD: _run_max_pool}
_handlers = {}


def _target(kind: str) -> str:
  if kind in CONVOLUTION_KINDS:
    return f'jaxlab_onednn_convolution_{kind}'
  return f'jaxlab_onednn_{kind}'


_registration_lock = threading.Lock()


def available() -> bool:
  """Whether oneDNN loaded; registers the FFI targets the first time."""
  if _library() is None:
    return False
  with _registration_lock:  # Tracing threads must not register twice.
    for kind in _RUNNERS:
      if kind not in _handlers:
        _handlers[kind] = _handler(kind)  # Kept alive: XLA holds it.
        jax.ffi.register_ffi_target(_target(kind),
                                    jax.ffi.pycapsule(_handlers[kind]),
                                    platform='cpu')
  return True


# dnnl_cpu_isa_t (oneDNN 3.2): each ISA's bits include those of the ISAs
# it extends.
_ISAS = {0x1fef: 'avx512_core_amx_fp16', 0xfef: 'avx512_core_amx',
         0x1ef: 'avx512_core_fp16', 0xe7: 'avx512_core_bf16',
         0x67: 'avx512_core_vnni', 0x27: 'avx512_core', 0x1f: 'avx2_vnni_2',
         0xf: 'avx2_vnni', 0x7: 'avx2', 0x3: 'avx', 0x1: 'sse41'}
_ISA_AVX512_CORE_BF16 = 0xe7


def cpu_isa() -> str:
  """The instruction set oneDNN runs on here, e.g. 'avx512_core_amx'."""
  isa = _library().dnnl_get_effective_cpu_isa()
  return next((name for bits, name in _ISAS.items() if isa & bits == bits),
              'default')


def bfloat16_supported() -> bool:
  """Whether this CPU computes in bfloat16 (AVX512-BF16 or AMX-BF16), so
  that oneDNN runs bfloat16 primitives natively."""
  if _library() is None:
    return False
  isa = _library().dnnl_get_effective_cpu_isa()
  return isa & _ISA_AVX512_CORE_BF16 == _ISA_AVX512_CORE_BF16


def enabled() -> bool:
  """Whether convolutions and BatchNorm on CPU go through oneDNN: it loaded,
  and $JAXLAB_ONEDNN is not '0'."""
  return os.environ.get('JAXLAB_ONEDNN', '1') != '0' and available()


def _call(kind, results, *operands, **attributes):
  """Calls `kind` on operands; `results`: ShapeDtypeStructs."""
  if not available():  # Also registers the handlers, on the first call.
    raise RuntimeError('oneDNN is not available: install the '
                       'onednn-cpu-gomp wheel (requirements.txt)')
  return jax.ffi.ffi_call(
      _target(kind), results if len(results) > 1 else results[0],
      vmap_method='sequential')(*operands, **attributes)


def _call_convolution(kind, result_shapes, padding, *operands):
  (top, bottom), (left, right) = padding
  return _call(kind, [jax.ShapeDtypeStruct(shape, operands[0].dtype)
                      for shape in result_shapes], *operands,
               padding=np.array([top, bottom, left, right], np.int64))


def conv(x, kernel, bias, padding, relu: bool = False):
  """The stride-1 convolution of NHWC `x` (float32 or bfloat16) with HWIO
  `kernel`, plus `bias` over the output channels, and with `relu` max(0, .)
  of that; `padding` is ((top, bottom), (left, right))."""
  return _call_convolution(
      FORWARD_RELU if relu else FORWARD,
      [conv_output_shape(x.shape, kernel.shape, padding)], padding, x, kernel,
      bias)


def conv_input_grad(g, kernel, x_shape, padding):
  """The gradient of `conv` with respect to x, for output gradient `g`."""
  return _call_convolution(INPUT_GRAD, [x_shape], padding, g, kernel)


def conv_kernel_grad(x, g, kernel_shape, padding):
  """The gradients of `conv` with respect to the kernel and the bias:
  (dkernel, dbias)."""
  return _call_convolution(KERNEL_GRAD, [kernel_shape, kernel_shape[-1:]],
                           padding, x, g)


def batch_norm_relu(x, mean, var, scale, bias):
  """max(0, (x - mean) / sqrt(var) * scale + bias) over the channels of
  NHWC `x` (float32 or bfloat16), with float32 statistics given (`var`
  includes epsilon); returns y and the workspace that
  `batch_norm_relu_grad` takes."""
  operation = _batch_norm_relu(BATCH_NORM_RELU, x.shape, x.dtype.name)
  return _call(BATCH_NORM_RELU,
               [jax.ShapeDtypeStruct(x.shape, x.dtype),
                jax.ShapeDtypeStruct((operation.workspace_size,), np.uint8)],
               x, mean, var, scale, bias)


def batch_norm_relu_grad(x, mean, var, scale, workspace, dy):
  """The gradients (dx, dscale, dbias) of `batch_norm_relu` in training,
  where mean and var are x's own batch statistics (dx goes through them)."""
  size = _batch_norm_relu(BATCH_NORM_RELU_GRAD, x.shape,
                          x.dtype.name).workspace_size
  if workspace.shape != (size,):
    raise ValueError(f'oneDNN BatchNorm gradient: workspace of shape '
                     f'{workspace.shape}, expected ({size},) for x of shape '
                     f'{x.shape}, as batch_norm_relu returns it')
  vector = jax.ShapeDtypeStruct(scale.shape, np.float32)
  return _call(BATCH_NORM_RELU_GRAD,
               [jax.ShapeDtypeStruct(x.shape, x.dtype), vector, vector],
               x, mean, var, scale, workspace, dy)


def dense(x, kernel, bias):
  """x @ kernel + bias for x [batch, in], kernel [in, out], bias [out]."""
  return _call(DENSE, [jax.ShapeDtypeStruct((x.shape[0], kernel.shape[1]),
                                            x.dtype)], x, kernel, bias)


def dense_input_grad(g, kernel):
  """g @ kernel.T: the gradient of `dense` with respect to x."""
  return _call(DENSE_INPUT_GRAD, [jax.ShapeDtypeStruct(
      (g.shape[0], kernel.shape[0]), g.dtype)], g, kernel)


def dense_kernel_grad(x, g):
  """x.T @ g: the gradient of `dense` with respect to the kernel."""
  return _call(DENSE_KERNEL_GRAD, [jax.ShapeDtypeStruct(
      (x.shape[1], g.shape[1]), g.dtype)], x, g)


def max_pool(x, k: int, stride: int, padding: int):
  """The max over k x k windows of NHWC `x` (float32 or bfloat16), `stride`
  apart, with `padding` on every side that is never a maximum; returns y
  and the workspace that `max_pool_grad` takes."""
  b, height, width, c = x.shape
  y_shape = (b, pooled_size(height, k, stride, padding),
             pooled_size(width, k, stride, padding), c)
  size = _max_pool_op(MAX_POOL, x.shape, k, stride, padding,
                      x.dtype.name).workspace_size
  return _call(MAX_POOL, [jax.ShapeDtypeStruct(y_shape, x.dtype),
                          jax.ShapeDtypeStruct((size,), np.uint8)],
               x, window=np.array([k, stride, padding], np.int64))


def max_pool_grad(workspace, dy, x_shape, k: int, stride: int, padding: int):
  """The gradient of `max_pool` with respect to x, for output gradient
  `dy`."""
  size = _max_pool_op(MAX_POOL_GRAD, tuple(x_shape), k, stride, padding,
                      dy.dtype.name).workspace_size
  if workspace.shape != (size,):
    raise ValueError(f'oneDNN max-pool gradient: workspace of shape '
                     f'{workspace.shape}, expected ({size},) for x of shape '
                     f'{tuple(x_shape)}, as max_pool returns it')
  return _call(MAX_POOL_GRAD, [jax.ShapeDtypeStruct(tuple(x_shape), dy.dtype)],
               workspace, dy, window=np.array([k, stride, padding], np.int64))
