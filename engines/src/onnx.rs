//! The ONNX Runtime engine: serves any `.onnx` file with Microsoft's ONNX Runtime, through
//! the [`ort`] crate.
//!
//! # The runtime library
//!
//! Cohort does not link ONNX Runtime: it loads the shared library at run time (`ort`'s
//! `load-dynamic`), once per process. [`find_library`] says which file: the node's
//! `onnxruntime.library` setting, else the `COHORT_ORT_LIB` environment variable, else the
//! library inside the `onnxruntime` Python package (`pip install onnxruntime` puts it in
//! `site-packages/onnxruntime/capi/libonnxruntime.so.1.*`), found by asking `python3`.
//! [`init_runtime`] loads it and creates the process's one ONNX Runtime environment; a second
//! call with the same library reuses it, one with another library is refused (a process
//! cannot switch runtimes). A missing or wrong library is an [`EngineError::Load`] that
//! names the file tried and the fix; nothing here panics.
//!
//! # Sessions
//!
//! [`load`] opens one session per replica: the model's `options.intra_op_threads` (else the
//! node's default) intra-op threads, one inter-op thread, every graph optimization. Idle
//! intra-op threads sleep rather than spin (`options.intra_op_spinning`, default off,
//! unlike ONNX Runtime's own default): on a node they share the cores with the HTTP
//! workers, and a spinning thread takes a core from the request that would feed it. On
//! `cuda:N` (builds with the `cuda` feature) the session registers ONNX Runtime's CUDA
//! execution provider on GPU `N` and fails to load if it cannot.
//!
//! The model's inputs and outputs, with their element types and shapes, become the engine's
//! [`ModelMetadata`]; symbolic or unknown dimensions are `-1`. Element types: f32, f64, f16,
//! i64, i32, i8, u8, bool and string.
//!
//! # Inference
//!
//! [`OnnxEngine::infer`] hands ONNX Runtime views of the request's buffers (no copy; f16 and
//! string inputs are the exception, copied once), runs the whole graph, and copies each
//! output once into a [`Tensor`] whose shape is the output's.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use cohort_config::ModelConfig;
use ort::environment::Environment;
use ort::memory::Allocator;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{Session, SessionInputValue, SessionInputs};
use ort::value::{
    DynTensor, DynTensorValueType, DynValue, TensorElementType, TensorRef, ValueType,
};

use crate::{
    DType, Device, Engine, EngineError, InputError, LoadContext, ModelMetadata, Tensor, TensorData,
    TensorMap, TensorSpec,
};

/// The environment variable naming the ONNX Runtime library when the config does not.
pub const LIBRARY_ENV: &str = "COHORT_ORT_LIB";

/// What to do about a missing or wrong ONNX Runtime library.
const FIX: &str =
    "install it with `pip install onnxruntime`, or set onnxruntime.library / COHORT_ORT_LIB";

/// Asks Python where the `onnxruntime` package lives, without importing it (importing loads
/// the whole runtime, which is slow and fails for unrelated reasons such as numpy).
const PYTHON_FIND: &str = "import importlib.util, os\n\
s = importlib.util.find_spec('onnxruntime')\n\
print(os.path.dirname(s.origin) if s is not None and s.origin else '')";

fn load_error(path: impl AsRef<Path>, reason: String) -> EngineError {
    EngineError::Load {
        path: path.as_ref().display().to_string(),
        reason,
    }
}

/// The ONNX Runtime shared library to load: `configured` (the node's `onnxruntime.library`),
/// else `$COHORT_ORT_LIB`, else `libonnxruntime.so*` in the `capi/` folder of the
/// `onnxruntime` Python package that `python3` finds.
///
/// Only checks that the file exists; [`init_runtime`] checks that it is a usable library.
pub fn find_library(configured: Option<&Path>) -> Result<PathBuf, EngineError> {
    if let Some(path) = configured {
        return existing_file(path, "onnxruntime.library");
    }
    if let Some(path) = std::env::var_os(LIBRARY_ENV).filter(|v| !v.is_empty()) {
        return existing_file(Path::new(&path), LIBRARY_ENV);
    }
    python_library()
}

fn existing_file(path: &Path, source: &str) -> Result<PathBuf, EngineError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(path.to_path_buf()),
        Ok(_) => Err(load_error(
            path,
            format!("the ONNX Runtime library named by {source} is not a file; {FIX}"),
        )),
        Err(e) => Err(load_error(
            path,
            format!("the ONNX Runtime library named by {source} cannot be read ({e}); {FIX}"),
        )),
    }
}

/// Successful Python look-ups, so that each replica does not start a `python3`.
static PYTHON_LIBRARY: Mutex<Option<PathBuf>> = Mutex::new(None);

fn python_library() -> Result<PathBuf, EngineError> {
    let mut cached = PYTHON_LIBRARY
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(path) = cached.as_ref() {
        return Ok(path.clone());
    }
    let what = "python3 (looking for the onnxruntime package)";
    let out = Command::new("python3")
        .args(["-c", PYTHON_FIND])
        .output()
        .map_err(|e| {
            load_error(
                what,
                format!(
                    "no ONNX Runtime library configured and python3 cannot be run ({e}); {FIX}"
                ),
            )
        })?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || dir.is_empty() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let detail = stderr.trim().lines().last().unwrap_or("").to_string();
        return Err(load_error(
            what,
            format!(
                "no ONNX Runtime library configured and python3 finds no onnxruntime package{}; {FIX}",
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({detail})")
                }
            ),
        ));
    }
    let capi = Path::new(&dir).join("capi");
    let path = library_in(&capi)?;
    *cached = Some(path.clone());
    Ok(path)
}

/// The real (versioned, not a symlink) `libonnxruntime.so*` in `dir`.
fn library_in(dir: &Path) -> Result<PathBuf, EngineError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        load_error(
            dir,
            format!("cannot list the onnxruntime package's capi folder ({e}); {FIX}"),
        )
    })?;
    // (is a regular file, name length, name): the longest regular file's name is the most
    // specific version (libonnxruntime.so.1.24.1 over a libonnxruntime.so symlink).
    let best = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_lib = name.starts_with("libonnxruntime.so")
                || (name.starts_with("libonnxruntime.") && name.ends_with(".dylib"));
            let regular = entry.file_type().is_ok_and(|t| t.is_file());
            is_lib.then(|| ((regular, name.len(), name), entry.path()))
        })
        .max_by(|a, b| a.0.cmp(&b.0));
    best.map(|(_, path)| path).ok_or_else(|| {
        load_error(
            dir,
            format!("the onnxruntime Python package has no libonnxruntime.so* here; {FIX}"),
        )
    })
}

/// The process's ONNX Runtime: the library loaded and the environment made from it.
struct Runtime {
    library: PathBuf,
    env: Option<Environment>,
}

static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);

/// Loads the ONNX Runtime library at `library` (once per process) and returns the process's
/// ONNX Runtime environment. A second call with the same file reuses it; a call with another
/// file after a successful one is an error, since a process cannot switch libraries.
///
/// The file is checked (it exists, it is a shared library) before ONNX Runtime is asked to
/// load it, and a library that cannot be loaded leaves the process free to load another.
pub fn init_runtime(library: &Path) -> Result<Environment, EngineError> {
    let given = library;
    let library = checked_library(given)?;
    let mut state = RUNTIME.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(rt) = state.as_ref() {
        if rt.library != library {
            return Err(load_error(
                given,
                format!(
                    "this process already loaded ONNX Runtime from {}, and cannot switch to \
                     another library; give every model of a node the same onnxruntime.library",
                    rt.library.display()
                ),
            ));
        }
        if let Some(env) = &rt.env {
            return Ok(env.clone());
        }
    } else {
        // `ort::init_from` returns an error for a library that cannot be loaded; it should not
        // panic, but a panic here must not take the node down.
        let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| ort::init_from(&library)));
        match loaded {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(load_error(
                    given,
                    format!("ONNX Runtime cannot be loaded from this file: {e}; {FIX}"),
                ))
            }
            Err(panic) => {
                return Err(load_error(
                    given,
                    format!(
                        "loading ONNX Runtime from this file failed: {}; {FIX}",
                        panic_message(&*panic)
                    ),
                ))
            }
        }
        *state = Some(Runtime {
            library: library.clone(),
            env: None,
        });
    }
    // The library is loaded; make the environment (ort allows one per process, kept alive
    // here for the life of the process).
    let built = std::panic::catch_unwind(AssertUnwindSafe(|| {
        ort::init()
            .with_name("cohort")
            .with_telemetry(false)
            .build()
    }));
    let env = match built {
        Ok(Ok(env)) => env,
        Ok(Err(e)) => {
            return Err(load_error(
                given,
                format!("cannot create the ONNX Runtime environment: {e}"),
            ))
        }
        Err(panic) => {
            return Err(load_error(
                given,
                format!(
                    "creating the ONNX Runtime environment failed: {}; {FIX}",
                    panic_message(&*panic)
                ),
            ))
        }
    };
    if let Some(rt) = state.as_mut() {
        rt.env = Some(env.clone());
    }
    Ok(env)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".into()
    }
}

/// The library's canonical path, after checking that it is a readable shared library
/// (ELF, Mach-O or PE), so that junk never reaches the dynamic loader.
fn checked_library(library: &Path) -> Result<PathBuf, EngineError> {
    use std::io::Read;
    let canonical = library.canonicalize().map_err(|e| {
        load_error(
            library,
            format!("no ONNX Runtime library here ({e}); {FIX}"),
        )
    })?;
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(&canonical).and_then(|mut f| f.read_exact(&mut magic));
    if let Err(e) = read {
        return Err(load_error(
            library,
            format!("the ONNX Runtime library cannot be read ({e}); {FIX}"),
        ));
    }
    const MAGICS: [[u8; 4]; 6] = [
        *b"\x7fELF",
        [0xfe, 0xed, 0xfa, 0xce],
        [0xfe, 0xed, 0xfa, 0xcf],
        [0xce, 0xfa, 0xed, 0xfe],
        [0xcf, 0xfa, 0xed, 0xfe],
        [0xca, 0xfe, 0xba, 0xbe],
    ];
    if !MAGICS.contains(&magic) && magic[..2] != *b"MZ" {
        return Err(load_error(
            library,
            format!("this file is not a shared library, so not ONNX Runtime; {FIX}"),
        ));
    }
    Ok(canonical)
}

/// A model served by ONNX Runtime: one session, run on the replica's thread.
pub struct OnnxEngine {
    session: Session,
    meta: ModelMetadata,
    file_bytes: u64,
}

impl std::fmt::Debug for OnnxEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxEngine")
            .field("meta", &self.meta)
            .field("file_bytes", &self.file_bytes)
            .finish_non_exhaustive()
    }
}

/// Loads the `.onnx` file at `path` for `model`: finds and initialises ONNX Runtime (see
/// [`find_library`], [`init_runtime`]), then opens a session on `ctx.device`.
pub fn load(
    path: &Path,
    model: &ModelConfig,
    ctx: &LoadContext,
) -> Result<OnnxEngine, EngineError> {
    let err = |reason: String| load_error(path, reason);
    // The device first: a CPU-only build says so before anything is loaded.
    let cuda_device = match ctx.device {
        Device::Cpu => None,
        Device::Cuda(n) => Some(cuda_device_id(n)?),
    };
    let file = std::fs::metadata(path).map_err(|e| err(format!("cannot read the model ({e})")))?;
    if !file.is_file() {
        return Err(err("the model path is not a file".into()));
    }
    let library = find_library(ctx.ort_library.as_deref())?;
    let env = init_runtime(&library)?;
    let threads = model
        .options
        .intra_op_threads
        .unwrap_or(ctx.default_threads)
        .max(1);
    let spinning = model.options.intra_op_spinning.unwrap_or(false);
    let builder = session_builder(&env, threads, cuda_device)
        .and_then(|b| {
            b.with_intra_op_spinning(spinning)
                .map_err(|e| format!("cannot configure an ONNX Runtime session: {e}"))
        })
        .map_err(err)?;
    let session = commit(builder, path).map_err(err)?;
    let meta = metadata(&session).map_err(err)?;
    Ok(OnnxEngine {
        session,
        meta,
        file_bytes: file.len(),
    })
}

/// Checks that a GPU can be used and returns its id for ONNX Runtime.
#[cfg(feature = "cuda")]
fn cuda_device_id(n: usize) -> Result<i32, EngineError> {
    i32::try_from(n).map_err(|_| load_error(format!("cuda:{n}"), "no such GPU".into()))
}

/// Without the `cuda` feature there is no GPU support at all.
#[cfg(not(feature = "cuda"))]
fn cuda_device_id(n: usize) -> Result<i32, EngineError> {
    Err(load_error(
        format!("cuda:{n}"),
        "the onnx engine cannot run on a GPU: this build has no CUDA support \
         (build with --features cuda)"
            .into(),
    ))
}

/// A session builder with Cohort's settings: `threads` intra-op threads, one inter-op
/// thread, every graph optimization, and the CUDA execution provider on `cuda_device`.
pub(crate) fn session_builder(
    env: &Environment,
    threads: usize,
    cuda_device: Option<i32>,
) -> Result<SessionBuilder, String> {
    let builder = configured(env, threads)
        .map_err(|e| format!("cannot configure an ONNX Runtime session: {e}"))?;
    match cuda_device {
        None => Ok(builder),
        Some(id) => with_cuda(builder, id),
    }
}

fn configured(env: &Environment, threads: usize) -> ort::Result<SessionBuilder> {
    Ok(Session::builder(env)?
        .with_intra_threads(threads)?
        .with_inter_threads(1)?
        .with_optimization_level(GraphOptimizationLevel::All)?)
}

#[cfg(feature = "cuda")]
fn with_cuda(builder: SessionBuilder, id: i32) -> Result<SessionBuilder, String> {
    let cuda = ort::ep::CUDA::default()
        .with_device_id(id)
        .build()
        .error_on_failure();
    builder.with_execution_providers([cuda]).map_err(|e| {
        format!(
            "cannot register ONNX Runtime's CUDA execution provider on cuda:{id}: {e} \
             (it needs the GPU build of ONNX Runtime, `pip install onnxruntime-gpu`, and the \
             CUDA and cuDNN libraries)"
        )
    })
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(_builder: SessionBuilder, id: i32) -> Result<SessionBuilder, String> {
    Err(format!(
        "cuda:{id}: this build has no CUDA support (build with --features cuda)"
    ))
}

pub(crate) fn commit(mut builder: SessionBuilder, path: &Path) -> Result<Session, String> {
    builder
        .commit_from_file(path)
        .map_err(|e| format!("ONNX Runtime cannot load this model: {e}"))
}

/// Cohort's name for an ONNX element type, if Cohort supports it.
fn dtype_of(ty: TensorElementType) -> Option<DType> {
    Some(match ty {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float64 => DType::F64,
        TensorElementType::Float16 => DType::F16,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Int8 => DType::I8,
        TensorElementType::Uint8 => DType::U8,
        TensorElementType::Bool => DType::Bool,
        TensorElementType::String => DType::String,
        _ => return None,
    })
}

fn spec_of(kind: &str, name: &str, ty: &ValueType) -> Result<TensorSpec, String> {
    match ty {
        ValueType::Tensor { ty, shape, .. } => {
            let dtype = dtype_of(*ty).ok_or_else(|| {
                format!(
                    "{kind} {name:?} has element type {ty}, which Cohort does not serve \
                     (f32, f64, f16, i64, i32, i8, u8, bool, string)"
                )
            })?;
            Ok(TensorSpec {
                name: name.to_string(),
                dtype,
                shape: shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect(),
            })
        }
        other => Err(format!("{kind} {name:?} is a {other}, not a tensor")),
    }
}

pub(crate) fn metadata(session: &Session) -> Result<ModelMetadata, String> {
    let inputs = session
        .inputs()
        .iter()
        .map(|o| spec_of("input", o.name(), o.dtype()))
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = session
        .outputs()
        .iter()
        .map(|o| spec_of("output", o.name(), o.dtype()))
        .collect::<Result<Vec<_>, _>>()?;
    if inputs.is_empty() {
        return Err("the model takes no inputs".into());
    }
    Ok(ModelMetadata { inputs, outputs })
}

/// An ONNX Runtime value for `t`: a view of its buffer for every type but f16 and string.
pub(crate) fn input_value(t: &Tensor) -> Result<SessionInputValue<'_>, ort::Error> {
    let shape = t.shape.as_slice();
    macro_rules! view {
        ($v:expr) => {
            TensorRef::from_array_view((shape, $v.as_slice()))?.into()
        };
    }
    Ok(match &t.data {
        TensorData::F32(v) => view!(v),
        TensorData::F64(v) => view!(v),
        TensorData::I64(v) => view!(v),
        TensorData::I32(v) => view!(v),
        TensorData::I8(v) => view!(v),
        TensorData::U8(v) => view!(v),
        TensorData::Bool(v) => view!(v),
        TensorData::F16(v) => {
            // ort's f16 element type needs its `half` feature; copy the bits into a tensor
            // of the right type instead.
            let expected: usize = shape.iter().product();
            if expected != v.len() {
                return Err(ort::Error::new(format!(
                    "shape {shape:?} holds {expected} elements but the data has {}",
                    v.len()
                )));
            }
            let mut tensor = DynTensor::new(
                &Allocator::default(),
                TensorElementType::Float16,
                shape.to_vec(),
            )?;
            if !v.is_empty() {
                let dst = tensor.data_ptr_mut().cast::<u16>();
                if dst.is_null() {
                    return Err(ort::Error::new(
                        "ONNX Runtime gave no buffer for an f16 input",
                    ));
                }
                // SAFETY: the tensor was just allocated on the CPU for `v.len()` f16 elements
                // (2 bytes each, as `half::f16`), and nothing else refers to it.
                let dst = unsafe { std::slice::from_raw_parts_mut(dst, v.len()) };
                for (d, s) in dst.iter_mut().zip(v) {
                    *d = s.to_bits();
                }
            }
            tensor.into()
        }
        TensorData::String(v) => {
            ort::value::Tensor::from_string_array((shape, v.as_slice()))?.into()
        }
    })
}

/// Copies an output into a [`Tensor`].
fn output_tensor(value: &DynValue) -> Result<Tensor, String> {
    let ValueType::Tensor { ty, shape, .. } = value.dtype() else {
        return Err(format!("is a {}, not a tensor", value.dtype()));
    };
    let dims = shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("has a negative dimension: {shape:?}")))
        .collect::<Result<Vec<usize>, String>>()?;
    macro_rules! copy {
        ($variant:ident, $t:ty) => {
            TensorData::$variant(
                value
                    .try_extract_tensor::<$t>()
                    .map_err(|e| e.to_string())?
                    .1
                    .to_vec(),
            )
        };
    }
    let data = match ty {
        TensorElementType::Float32 => copy!(F32, f32),
        TensorElementType::Float64 => copy!(F64, f64),
        TensorElementType::Int64 => copy!(I64, i64),
        TensorElementType::Int32 => copy!(I32, i32),
        TensorElementType::Int8 => copy!(I8, i8),
        TensorElementType::Uint8 => copy!(U8, u8),
        TensorElementType::Bool => copy!(Bool, bool),
        TensorElementType::Float16 => TensorData::F16(f16_output(value, shape.num_elements())?),
        TensorElementType::String => {
            TensorData::String(value.try_extract_strings().map_err(|e| e.to_string())?.1)
        }
        other => {
            return Err(format!(
                "has element type {other}, which Cohort does not serve"
            ))
        }
    };
    Tensor::new(dims, data).map_err(|e| e.to_string())
}

fn f16_output(value: &DynValue, len: usize) -> Result<Vec<half::f16>, String> {
    let tensor = value
        .view()
        .downcast::<DynTensorValueType>()
        .map_err(|e| e.to_string())?;
    if !tensor.memory_info().is_cpu_accessible() {
        return Err("is not in CPU memory".into());
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    let ptr = tensor.data_ptr().cast::<u16>();
    if ptr.is_null() {
        return Err("has no data".into());
    }
    // SAFETY: the value is a CPU tensor of element type Float16 (checked by the caller) with
    // `len` elements of 2 bytes; ONNX Runtime's allocations are suitably aligned, and the
    // buffer lives as long as `value`, which outlives this copy.
    let bits = unsafe { std::slice::from_raw_parts(ptr, len) };
    Ok(bits.iter().map(|&b| half::f16::from_bits(b)).collect())
}

impl OnnxEngine {
    /// Runs the session on `inputs`, which must hold exactly the model's inputs.
    fn run(&mut self, inputs: &TensorMap) -> Result<TensorMap, EngineError> {
        if let Some(extra) = inputs
            .keys()
            .find(|k| !self.meta.inputs.iter().any(|s| &s.name == *k))
        {
            let expected: Vec<_> = self.meta.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(InputError {
                input: extra.clone(),
                reason: format!("unknown input; the model takes {expected:?}"),
            }
            .into());
        }
        // In the session's input order, which is the metadata's.
        let mut values: Vec<SessionInputValue<'_>> = Vec::with_capacity(self.meta.inputs.len());
        for spec in &self.meta.inputs {
            let t = inputs.get(&spec.name).ok_or_else(|| InputError {
                input: spec.name.clone(),
                reason: "missing".into(),
            })?;
            if t.dtype() != spec.dtype {
                return Err(InputError {
                    input: spec.name.clone(),
                    reason: format!("expected dtype {}, got {}", spec.dtype, t.dtype()),
                }
                .into());
            }
            values.push(input_value(t).map_err(|e| InputError {
                input: spec.name.clone(),
                reason: e.to_string(),
            })?);
        }
        let outputs = self
            .session
            .run(SessionInputs::<'_, '_, 0>::ValueSlice(&values))
            .map_err(|e| {
                if e.code() == ort::error::ErrorCode::InvalidArgument {
                    refused_input(&self.meta, e.message())
                } else {
                    EngineError::Inference(e.to_string())
                }
            })?;
        let mut out = TensorMap::new();
        for (i, spec) in self.meta.outputs.iter().enumerate() {
            let t = output_tensor(&outputs[i])
                .map_err(|e| EngineError::Inference(format!("output {:?} {e}", spec.name)))?;
            out.insert(spec.name.clone(), t);
        }
        Ok(out)
    }
}

/// ONNX Runtime's refusal of the inputs themselves (`INVALID_ARGUMENT` from `run`: a
/// dimension, rank or type that Cohort's own checks let through) is the client's mistake,
/// an input error; any other failure of `run` is an inference failure.
fn refused_input(meta: &ModelMetadata, msg: &str) -> EngineError {
    // ORT names the input as "... for input: NAME ...": the word after the marker, if
    // it is one of the model's inputs.
    let input = msg
        .split_once("input: ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .filter(|word| meta.inputs.iter().any(|s| s.name == *word))
        .unwrap_or_default();
    EngineError::Input(InputError {
        input: input.to_string(),
        reason: format!("ONNX Runtime refused it: {}", msg.trim()),
    })
}

impl Engine for OnnxEngine {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn infer(&mut self, inputs: &TensorMap) -> Result<TensorMap, EngineError> {
        self.run(inputs)
    }

    /// The model file's size: the weights dominate it, and ONNX Runtime holds them once.
    fn memory_bytes(&self) -> u64 {
        self.file_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_versioned_library_wins_over_links_and_providers() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "libonnxruntime_providers_shared.so",
            "libonnxruntime.so.1.24.1",
            "__init__.py",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        #[cfg(unix)]
        std::os::unix::fs::symlink(
            dir.path().join("libonnxruntime.so.1.24.1"),
            dir.path().join("libonnxruntime.so.1"),
        )
        .unwrap();
        let found = library_in(dir.path()).unwrap();
        assert_eq!(found, dir.path().join("libonnxruntime.so.1.24.1"));

        let empty = tempfile::tempdir().unwrap();
        let e = library_in(empty.path()).unwrap_err().to_string();
        assert!(e.contains("pip install onnxruntime"), "{e}");
    }

    #[test]
    fn junk_and_missing_libraries_are_refused_before_loading() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("libonnxruntime.so.1.99.0");
        std::fs::write(&junk, b"this is not a library").unwrap();
        let e = checked_library(&junk).unwrap_err().to_string();
        assert!(e.contains("not a shared library") && e.contains(FIX), "{e}");
        let missing = dir.path().join("nope.so");
        let e = find_library(Some(&missing)).unwrap_err().to_string();
        assert!(e.contains("nope.so") && e.contains(FIX), "{e}");
    }

    #[test]
    fn a_gpu_without_cuda_support_is_a_clear_error() {
        if cfg!(feature = "cuda") {
            return;
        }
        let e = cuda_device_id(0).unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }

    #[test]
    fn an_invalid_argument_from_onnx_runtime_is_an_input_error_naming_the_input() {
        let meta = ModelMetadata {
            inputs: vec![
                crate::TensorSpec::new("x", DType::F32, &[1, 3]),
                crate::TensorSpec::new("x2", DType::F32, &[]),
            ],
            outputs: vec![],
        };
        let msg = "Got invalid dimensions for input: x2 for the following indices\n index: 0 Got: 2 Expected: 1";
        match refused_input(&meta, msg) {
            EngineError::Input(e) => {
                assert_eq!(e.input, "x2");
                assert!(e.reason.contains("invalid dimensions"), "{e}");
            }
            other => panic!("expected an input error, got {other}"),
        }
        // A message that names no input still makes an input error, with no name.
        match refused_input(&meta, "Unexpected input data type") {
            EngineError::Input(e) => assert_eq!(e.input, ""),
            other => panic!("expected an input error, got {other}"),
        }
    }
}
