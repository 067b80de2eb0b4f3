//! Test engines: `echo`, `sleep` and `fail`.
//!
//! They take any f32 input `x` of shape `[N, -1]` and give it back as `y`, so a test can
//! check that every request got its own answer back, in order. `sleep` holds the engine
//! thread for a set time (queueing, deadlines, overload); `fail` errors or panics on every
//! Nth call (error mapping, replica restarts).

use std::time::Duration;

use cohort_config::FailMode;

use crate::{DType, Engine, EngineError, ModelMetadata, TensorMap, TensorSpec};

fn echo_metadata() -> ModelMetadata {
    ModelMetadata {
        inputs: vec![TensorSpec::new("x", DType::F32, &[-1, -1])],
        outputs: vec![TensorSpec::new("y", DType::F32, &[-1, -1])],
    }
}

fn echo(inputs: &TensorMap) -> Result<TensorMap, EngineError> {
    let x = inputs
        .get("x")
        .ok_or_else(|| EngineError::Inference("input x is missing".into()))?;
    let mut out = TensorMap::new();
    out.insert("y".into(), x.clone());
    Ok(out)
}

/// Gives `x` back as `y`.
pub struct Echo {
    meta: ModelMetadata,
}

impl Echo {
    pub fn new() -> Self {
        Echo {
            meta: echo_metadata(),
        }
    }
}

impl Default for Echo {
    fn default() -> Self {
        Self::new()
    }
}

impl Engine for Echo {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }
    fn infer(&mut self, inputs: &TensorMap) -> Result<TensorMap, EngineError> {
        echo(inputs)
    }
}

/// Sleeps, then echoes. Counts its calls so tests can see what reached the engine.
pub struct Sleep {
    meta: ModelMetadata,
    pause: Duration,
}

impl Sleep {
    pub fn new(pause: Duration) -> Self {
        Sleep {
            meta: echo_metadata(),
            pause,
        }
    }
}

impl Engine for Sleep {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }
    fn infer(&mut self, inputs: &TensorMap) -> Result<TensorMap, EngineError> {
        std::thread::sleep(self.pause);
        echo(inputs)
    }
}

/// Echoes, but every `every`-th call fails with an error or a panic.
pub struct Fail {
    meta: ModelMetadata,
    every: u64,
    mode: FailMode,
    calls: u64,
}

impl Fail {
    pub fn new(every: u64, mode: FailMode) -> Self {
        Fail {
            meta: echo_metadata(),
            every: every.max(1),
            mode,
            calls: 0,
        }
    }
}

impl Engine for Fail {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }
    fn infer(&mut self, inputs: &TensorMap) -> Result<TensorMap, EngineError> {
        self.calls += 1;
        if self.calls.is_multiple_of(self.every) {
            match self.mode {
                FailMode::Error => {
                    return Err(EngineError::Inference(format!(
                        "fail engine: call {} fails by design",
                        self.calls
                    )))
                }
                FailMode::Panic => panic!("fail engine: call {} panics by design", self.calls),
            }
        }
        echo(inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Tensor, TensorData};

    fn one() -> TensorMap {
        let mut m = TensorMap::new();
        m.insert(
            "x".into(),
            Tensor::new(vec![1, 1], TensorData::F32(vec![3.0])).unwrap(),
        );
        m
    }

    #[test]
    fn fail_errors_every_nth_call() {
        let mut f = Fail::new(3, FailMode::Error);
        assert!(f.infer(&one()).is_ok());
        assert!(f.infer(&one()).is_ok());
        assert!(f.infer(&one()).is_err());
        assert!(f.infer(&one()).is_ok());
    }

    #[test]
    fn fail_panics_in_panic_mode() {
        let mut f = Fail::new(1, FailMode::Panic);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.infer(&one())));
        assert!(r.is_err());
    }

    #[test]
    fn sleep_takes_its_time() {
        let mut s = Sleep::new(Duration::from_millis(20));
        let t = std::time::Instant::now();
        assert_eq!(s.infer(&one()).unwrap(), echo(&one()).unwrap());
        assert!(t.elapsed() >= Duration::from_millis(20));
    }
}
