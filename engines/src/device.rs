//! Devices a replica can be pinned to: the CPU, always, and NVIDIA GPUs when built with
//! the `cuda` feature.
//!
//! GPU discovery uses cudarc's driver API. On a machine without the CUDA driver,
//! [`discover`] lists only the CPU: it checks that the driver library is present before
//! asking it anything (cudarc panics otherwise), and turns any driver error into "no GPU".

use std::fmt;

use cohort_config::DeviceSpec;
use serde::Serialize;

/// A device a replica runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// The candle device for this device.
    pub fn candle(&self) -> Result<candle_core::Device, crate::EngineError> {
        match self {
            Device::Cpu => Ok(candle_core::Device::Cpu),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                candle_core::Device::new_cuda(*n).map_err(|e| crate::EngineError::Load {
                    path: self.to_string(),
                    reason: e.to_string(),
                })
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(crate::EngineError::Load {
                path: self.to_string(),
                reason: "this build has no CUDA support (build with --features cuda)".into(),
            }),
        }
    }
}

/// What the node knows of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda:N`.
    pub id: String,
    /// `cpu` or `cuda`.
    pub kind: &'static str,
    pub name: String,
    /// Bytes of memory (for the CPU: the machine's RAM).
    pub total_memory: u64,
    /// Bytes free now.
    pub free_memory: u64,
    /// CPU cores (for the CPU), or 0.
    pub cores: usize,
}

/// The machine's CPU as a device.
pub fn cpu_info() -> DeviceInfo {
    let (total, free) = meminfo().unwrap_or((0, 0));
    DeviceInfo {
        id: "cpu".into(),
        kind: "cpu",
        name: cpu_model().unwrap_or_else(|| "cpu".into()),
        total_memory: total,
        free_memory: free,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

fn meminfo() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// Every device of this machine: the CPU first, then each GPU.
pub fn discover() -> Vec<DeviceInfo> {
    let mut out = vec![cpu_info()];
    out.extend(gpus());
    out
}

#[cfg(feature = "cuda")]
fn gpus() -> Vec<DeviceInfo> {
    use cudarc::driver::{result, CudaContext};
    // Without a driver, cudarc panics on first use: treat a panic as "no GPU".
    let count = std::panic::catch_unwind(|| {
        result::init().ok()?;
        CudaContext::device_count().ok()
    })
    .ok()
    .flatten()
    .unwrap_or(0)
    .max(0) as usize;
    (0..count)
        .filter_map(|i| {
            let ctx = CudaContext::new(i).ok()?;
            let name = ctx.name().unwrap_or_else(|_| format!("cuda:{i}"));
            let (free, total) = ctx.mem_get_info().ok()?;
            Some(DeviceInfo {
                id: format!("cuda:{i}"),
                kind: "cuda",
                name,
                total_memory: total as u64,
                free_memory: free as u64,
                cores: 0,
            })
        })
        .collect()
}

#[cfg(not(feature = "cuda"))]
fn gpus() -> Vec<DeviceInfo> {
    Vec::new()
}

/// Why a device could not be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("device cuda:{0} does not exist on this node (it has {1} GPU(s))")]
    NoSuchGpu(usize, usize),
}

/// Chooses the device for a replica: `cpu` and `cuda:N` as written (N must exist);
/// `auto` takes the GPU with the most memory left if it has at least `need_bytes` left,
/// else the CPU. A GPU's memory left is its free memory at discovery less `reserved` for
/// it: what this node's replicas already placed there are expected to use, so that
/// several `auto` replicas do not all count on the same free memory.
pub fn resolve(
    spec: DeviceSpec,
    devices: &[DeviceInfo],
    need_bytes: u64,
    reserved: impl Fn(Device) -> u64,
) -> Result<Device, DeviceError> {
    let gpus: Vec<(usize, &DeviceInfo)> = devices
        .iter()
        .filter(|d| d.kind == "cuda")
        .filter_map(|d| {
            d.id.strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| (n, d))
        })
        .collect();
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => {
            if gpus.iter().any(|(i, _)| *i == n) {
                Ok(Device::Cuda(n))
            } else {
                Err(DeviceError::NoSuchGpu(n, gpus.len()))
            }
        }
        DeviceSpec::Auto => Ok(gpus
            .iter()
            .map(|(i, d)| {
                let left = d.free_memory.saturating_sub(reserved(Device::Cuda(*i)));
                (*i, left)
            })
            .filter(|(_, left)| *left >= need_bytes)
            .max_by_key(|(_, left)| *left)
            .map_or(Device::Cpu, |(i, _)| Device::Cuda(i))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(i: usize, free: u64) -> DeviceInfo {
        DeviceInfo {
            id: format!("cuda:{i}"),
            kind: "cuda",
            name: "test gpu".into(),
            total_memory: 80 << 30,
            free_memory: free,
            cores: 0,
        }
    }

    #[test]
    fn the_cpu_is_always_a_device() {
        let d = discover();
        assert_eq!(d[0].id, "cpu");
        assert!(d[0].cores >= 1);
    }

    #[test]
    fn auto_prefers_the_gpu_with_most_free_memory_that_fits() {
        let devs = vec![cpu_info(), gpu(0, 1 << 30), gpu(1, 8 << 30)];
        let none = |_| 0;
        assert_eq!(
            resolve(DeviceSpec::Auto, &devs, 2 << 30, none),
            Ok(Device::Cuda(1))
        );
        assert_eq!(
            resolve(DeviceSpec::Auto, &devs, 16 << 30, none),
            Ok(Device::Cpu)
        );
        assert_eq!(
            resolve(DeviceSpec::Auto, &devs[..1], 0, none),
            Ok(Device::Cpu)
        );
    }

    #[test]
    fn auto_counts_what_earlier_replicas_reserved() {
        let devs = vec![cpu_info(), gpu(0, 6 << 30), gpu(1, 8 << 30)];
        // Replicas of 3 GiB placed one after another, as the supervisor does: each
        // reservation lowers what the next one sees.
        let mut reserved = std::collections::HashMap::<Device, u64>::new();
        let mut placed = Vec::new();
        for _ in 0..5 {
            let d = resolve(DeviceSpec::Auto, &devs, 3 << 30, |d| {
                reserved.get(&d).copied().unwrap_or(0)
            })
            .unwrap();
            if d != Device::Cpu {
                *reserved.entry(d).or_insert(0) += 3 << 30;
            }
            placed.push(d);
        }
        assert_eq!(
            placed,
            [
                Device::Cuda(1),
                Device::Cuda(0),
                Device::Cuda(1),
                Device::Cuda(0),
                Device::Cpu
            ]
        );
        // A reservation larger than what was free leaves nothing, not an overflow.
        let full = |d| if d == Device::Cuda(1) { u64::MAX } else { 0 };
        assert_eq!(
            resolve(DeviceSpec::Auto, &devs, 1, full),
            Ok(Device::Cuda(0))
        );
    }

    #[test]
    fn explicit_devices_must_exist() {
        let devs = vec![cpu_info(), gpu(0, 1 << 30)];
        let none = |_| 0;
        assert_eq!(
            resolve(DeviceSpec::Cuda(0), &devs, 0, none),
            Ok(Device::Cuda(0))
        );
        assert_eq!(
            resolve(DeviceSpec::Cuda(3), &devs, 0, none),
            Err(DeviceError::NoSuchGpu(3, 1))
        );
        assert_eq!(resolve(DeviceSpec::Cpu, &devs, 0, none), Ok(Device::Cpu));
    }

    #[test]
    fn without_cuda_support_a_gpu_device_is_a_clear_error() {
        if cfg!(feature = "cuda") {
            return;
        }
        let err = Device::Cuda(0).candle().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
