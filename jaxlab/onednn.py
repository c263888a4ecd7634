"""oneDNN's convolutions as XLA:CPU operations.

XLA:CPU runs convolutions through Eigen; oneDNN, the library behind
PyTorch's CPU convolutions, runs this project's layers several times
faster. cnn_bn's 16 -> 16 channel layer at 180 x 180, batch 64, takes 50,
49 and 46 ms here for the forward pass, input gradient and kernel gradient,
against XLA's 282, 90 and 158 ms. This module binds oneDNN's C API with
ctypes and registers ctypes callbacks as XLA FFI handlers (forward, input
gradient, kernel and bias gradients): XLA hands them its own buffers, so
nothing is copied, and nothing needs compiling.

oneDNN comes from the `onednn-cpu-gomp` wheel (oneDNN 3.2, OpenMP threads;
Linux x86-64 only). `enabled()` says whether `jaxlab.ops` uses it: where it
did not load, or with JAXLAB_ONEDNN=0 in the environment (read when a step
is traced), convolutions are XLA's. Arrays are float32, NHWC inputs and HWIO
kernels, stride 1, padding of zero or more. Not differentiable twice and no
`vmap` rule beyond a loop: `ops.conv2d` gives first-order gradients.
"""

import ctypes
import functools
import importlib.metadata
import os
import threading

import jax
import numpy as np

# --- oneDNN's C API (oneDNN 3.2, dnnl_types.h and dnnl_common_types.h) ---

_DNNL_F32 = 3
_DNNL_CPU = 1
_DNNL_STREAM_IN_ORDER = 1
_TAG_ANY = 1
_TAG_A = 2  # dnnl_a: a vector (the bias)
_TAG_NHWC = 22  # dnnl_acdb for dims [N, C, H, W]
_TAG_HWIO = 28  # dnnl_cdba for dims [O, I, H, W]
_FORWARD_TRAINING = 64
_CONVOLUTION_DIRECT = 1
_QUERY_IMPL_INFO_STR = 8
_QUERY_SCRATCHPAD_MD = 136
_QUERY_EXEC_ARG_MD = 255
_SCRATCHPAD_MODE_USER = 1
_ARG_SRC = 1
_ARG_DST = 17
_ARG_WEIGHTS = 33
_ARG_SCRATCHPAD = 80
_ARG_DIFF_SRC = 129
_ARG_DIFF_DST = 145
_ARG_DIFF_WEIGHTS = 161
_ARG_DIFF_BIAS = 169
_MAX_NDIMS = 12

_Dims = ctypes.c_int64 * _MAX_NDIMS


class _ExecArg(ctypes.Structure):
  _fields_ = [('arg', ctypes.c_int), ('memory', ctypes.c_void_p)]


# --- XLA's FFI C API (jaxlib/include/xla/ffi/api/c_api.h, API 0.3) ---

_FFI_API_VERSION = (0, 3)
_FFI_EXTENSION_METADATA = 1
_FFI_DATA_TYPE_F32 = 11
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


def _output_shape(x_shape, kernel_shape, padding):
  """The NHWC shape of the stride-1 convolution of `x_shape` (NHWC) with
  `kernel_shape` (HWIO), `padding` ((top, bottom), (left, right))."""
  b, height, width, _ = x_shape
  kh, kw, _, cout = kernel_shape
  (top, bottom), (left, right) = padding
  return (b, height + top + bottom - kh + 1, width + left + right - kw + 1,
          cout)


def _memory_desc(dims, tag: int) -> ctypes.c_void_p:
  desc = ctypes.c_void_p()
  _check(_library().dnnl_memory_desc_create_with_tag(
      ctypes.byref(desc), len(dims), _Dims(*dims), _DNNL_F32, tag),
         'dnnl_memory_desc_create_with_tag')
  return desc


@functools.cache
def _user_scratchpad_attr() -> ctypes.c_void_p:
  """Primitive attributes: the caller passes each call's scratchpad.

  oneDNN's own (library) scratchpad is shared by concurrent calls of one
  primitive; the kernel gradient keeps its threads' barrier there, and two
  devices' steps running it at once (pmap over CPU devices) deadlocked.
  """
  attr = ctypes.c_void_p()
  _check(_library().dnnl_primitive_attr_create(ctypes.byref(attr)),
         'dnnl_primitive_attr_create')
  _check(_library().dnnl_primitive_attr_set_scratchpad_mode(
      attr, _SCRATCHPAD_MODE_USER), 'dnnl_primitive_attr_set_scratchpad_mode')
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


class _Convolution:
  """One oneDNN convolution primitive, for one kind and one set of shapes.

  The activations stay in XLA's NHWC layout. The kernel goes through the
  layout oneDNN picks for it (blocked over channels), reordered from or to
  XLA's HWIO on every call: kernels are small.
  """

  def __init__(self, kind: str, x_shape, kernel_shape, padding):
    b, height, width, cin = x_shape
    kh, kw, _, cout = kernel_shape
    (top, bottom), (left, right) = padding
    _, y_height, y_width, _ = _output_shape(x_shape, kernel_shape, padding)
    self.x = _memory_desc((b, cin, height, width), _TAG_NHWC)
    self.y = _memory_desc((b, cout, y_height, y_width), _TAG_NHWC)
    self.kernel = _memory_desc((cout, cin, kh, kw), _TAG_HWIO)
    any_kernel = _memory_desc((cout, cin, kh, kw), _TAG_ANY)
    # The kernel gradient computes the bias's too, in the same pass over dy.
    self.bias = _memory_desc((cout,), _TAG_A) if kind == KERNEL_GRAD else None
    geometry = (_Dims(1, 1), _Dims(0, 0), _Dims(top, left),
                _Dims(bottom, right))
    lib = _library()
    forward = ctypes.c_void_p()
    _check(lib.dnnl_convolution_forward_primitive_desc_create(
        ctypes.byref(forward), _engine(), _FORWARD_TRAINING,
        _CONVOLUTION_DIRECT, self.x, any_kernel, self.bias, self.y,
        *geometry, _user_scratchpad_attr()),
           'dnnl_convolution_forward_primitive_desc_create')
    if kind == FORWARD:
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

  def implementation(self) -> str:
    """The name of the oneDNN implementation chosen, e.g. 'jit:avx512_core'."""
    name = ctypes.c_char_p()
    _check(_library().dnnl_primitive_desc_query(
        self.primitive_desc, _QUERY_IMPL_INFO_STR, 0, ctypes.byref(name)),
           'dnnl_primitive_desc_query')
    return name.value.decode()

  def __call__(self, first: int, second: int, *results: int) -> None:
    """forward: (x, kernel) -> y; input_grad: (dy, kernel) -> dx;
    kernel_grad: (x, dy) -> (dkernel, dbias); all data pointers."""
    with _one_at_a_time:
      self._run(first, second, *results)

  def _run(self, first: int, second: int, result: int,
           bias_result: int | None = None) -> None:
    blocked, blocked_data = _aligned_buffer(self.blocked_kernel_size)
    kernel = (self.blocked_kernel, blocked_data)
    if self.kind == FORWARD:
      self.reorder(second, blocked_data)
      args = {_ARG_SRC: (self.x, first), _ARG_WEIGHTS: kernel,
              _ARG_DST: (self.y, result)}
    elif self.kind == INPUT_GRAD:
      self.reorder(second, blocked_data)
      args = {_ARG_DIFF_DST: (self.y, first), _ARG_WEIGHTS: kernel,
              _ARG_DIFF_SRC: (self.x, result)}
    else:
      args = {_ARG_SRC: (self.x, first), _ARG_DIFF_DST: (self.y, second),
              _ARG_DIFF_WEIGHTS: kernel,
              _ARG_DIFF_BIAS: (self.bias, bias_result)}
    _execute(self.primitive, self.scratchpad, args)
    if self.kind == KERNEL_GRAD:
      self.reorder(blocked_data, result)
    del blocked


_convolutions: dict = {}
# One convolution runs at a time: each already uses every core (OpenMP), and
# XLA runs independent operations at once (an input and a kernel gradient).
_one_at_a_time = threading.Lock()
_convolutions_lock = threading.Lock()


def _convolution(kind, x_shape, kernel_shape, padding) -> _Convolution:
  key = (kind, x_shape, kernel_shape, padding)
  with _convolutions_lock:
    if key not in _convolutions:
      _convolutions[key] = _Convolution(*key)
    return _convolutions[key]


def _buffer(pointer: int):
  buffer = ctypes.cast(pointer, ctypes.POINTER(_FfiBuffer)).contents
  if buffer.dtype != _FFI_DATA_TYPE_F32:
    raise ValueError(f'oneDNN convolutions take float32, got XLA FFI data '
                     f'type {buffer.dtype}')
  return buffer.data, tuple(buffer.dims[i] for i in range(buffer.rank))


def _run(kind: str, frame: _FfiCallFrame) -> None:
  """One call: two operand buffers, one result (the kernel gradient: two),
  and the attribute `padding` (int64 [top, bottom, left, right])."""
  (first, first_shape), (second, second_shape) = (
      _buffer(frame.args.items[i]) for i in range(2))
  results = [_buffer(frame.rets.items[i]) for i in range(frame.rets.size)]
  result_shape = results[0][1]
  padding = ctypes.cast(frame.attrs.items[0],
                        ctypes.POINTER(_FfiArray)).contents
  top, bottom, left, right = ctypes.cast(
      padding.data, ctypes.POINTER(ctypes.c_int64))[:4]
  x_shape, kernel_shape = {
      FORWARD: (first_shape, second_shape),
      INPUT_GRAD: (result_shape, second_shape),
      KERNEL_GRAD: (first_shape, result_shape)}[kind]
  convolution = _convolution(kind, x_shape, kernel_shape,
                             ((top, bottom), (left, right)))
  convolution(first, second, *(data for data, _ in results))


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
      _run(kind, frame)
    except BaseException as e:  # pylint: disable=broad-exception-caught
      # Nothing may cross into XLA (a KeyboardInterrupt included, which
      # would leave the returned error undefined); XLA reports the error.
      return _error(frame, f'jaxlab oneDNN {kind} convolution: '
                           f'{type(e).__name__}: {e}')
    return None

  return _FfiHandler(handle)


_handlers = {}


def _target(kind: str) -> str:
  return f'jaxlab_onednn_convolution_{kind}'


_registration_lock = threading.Lock()


def available() -> bool:
  """Whether oneDNN loaded; registers the FFI targets the first time."""
  if _library() is None:
    return False
  with _registration_lock:  # Tracing threads must not register twice.
    for kind in (FORWARD, INPUT_GRAD, KERNEL_GRAD):
      if kind not in _handlers:
        _handlers[kind] = _handler(kind)  # Kept alive: XLA holds it.
        jax.ffi.register_ffi_target(_target(kind),
                                    jax.ffi.pycapsule(_handlers[kind]),
                                    platform='cpu')
  return True


def enabled() -> bool:
  """Whether convolutions on CPU go through oneDNN: it loaded, and
  $JAXLAB_ONEDNN is not '0'."""
  return os.environ.get('JAXLAB_ONEDNN', '1') != '0' and available()


def _call(kind, result_shapes, first, second, padding):
  if not available():  # Also registers the handlers, on the first call.
    raise RuntimeError('oneDNN is not available: install the '
                       'onednn-cpu-gomp wheel (requirements.txt)')
  (top, bottom), (left, right) = padding
  results = tuple(jax.ShapeDtypeStruct(shape, first.dtype)
                  for shape in result_shapes)
  return jax.ffi.ffi_call(
      _target(kind), results if len(results) > 1 else results[0],
      vmap_method='sequential')(
          first, second,
          padding=np.array([top, bottom, left, right], np.int64))


def conv(x, kernel, padding):
  """The stride-1 convolution of NHWC float32 `x` with HWIO `kernel`;
  `padding` is ((top, bottom), (left, right))."""
  return _call(FORWARD, [_output_shape(x.shape, kernel.shape, padding)], x,
               kernel, padding)


def conv_input_grad(g, kernel, x_shape, padding):
  """The gradient of `conv` with respect to x, for output gradient `g`."""
  return _call(INPUT_GRAD, [x_shape], g, kernel, padding)


def conv_kernel_grad(x, g, kernel_shape, padding):
  """The gradients of `conv` followed by a bias over the output channels
  with respect to the kernel and the bias: (dkernel, dbias)."""
  return _call(KERNEL_GRAD, [kernel_shape, kernel_shape[-1:]], x, g, padding)
