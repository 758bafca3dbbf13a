//! Language models for MeZO in libtorch: HF checkpoints and tokenizers loaded as users have
//! them. OPT and the Llama family (Llama 2/3, Qwen2/2.5, Mistral), behind [`Model`].

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
pub mod llama;
pub mod llama_config;
pub mod lm;
pub mod lora;
pub mod model;
pub mod opt;
pub mod placement;
pub mod prefix;
pub mod scoring;
pub mod tokenizer;
pub mod torch_bin;

pub use config::OptConfig;
pub use error::{ModelError, Result};
pub use generate::Decoding;
pub use llama::Llama;
pub use llama_config::{LlamaConfig, LlamaFamily};
pub use lm::CausalLm;
pub use lora::{Adapter, LoraBatch, LoraConfig, LoraTensor, Target};
pub use model::{LoraModule, Model, ModelConfig, SUPPORTED_MODEL_TYPES};
pub use opt::{Opt, Padding, ScoreBatch};
pub use placement::{device_name, ParamCounts, Placement};
pub use prefix::{PrefixAdapter, PrefixBatch, PrefixConfig};
pub use tokenizer::TextTokenizer;

use tch::{Device, Kind};

/// The trained state a forward pass applies, row group by row group (see [`LoraBatch`] and
/// [`PrefixBatch`]): several variants of it (θ+εz, θ-εz, …) share one forward.
pub enum Tuning {
    Lora(LoraBatch),
    Prefix(PrefixBatch),
}

impl Tuning {
    pub fn variants(&self) -> i64 {
        match self {
            Tuning::Lora(l) => l.variants,
            Tuning::Prefix(p) => p.variants,
        }
    }

    pub fn lora(&self) -> Option<&LoraBatch> {
        match self {
            Tuning::Lora(l) => Some(l),
            Tuning::Prefix(_) => None,
        }
    }

    pub fn prefix(&self) -> Option<&PrefixBatch> {
        match self {
            Tuning::Prefix(p) => Some(p),
            Tuning::Lora(_) => None,
        }
    }

    /// A copy whose per-layer tensors sit on their layers' devices ([`Placement`]).
    pub fn placed(&self, p: &Placement) -> Tuning {
        match self {
            Tuning::Lora(l) => Tuning::Lora(l.placed(p)),
            Tuning::Prefix(x) => Tuning::Prefix(x.placed(p)),
        }
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let bad =
        || ModelError::InvalidArgument { what: "device", value: s.into(), expected: "cpu, cuda or cuda:N" };
    let device = match s {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        _ => Device::Cuda(s.strip_prefix("cuda:").ok_or_else(bad)?.parse().map_err(|_| bad())?),
    };
    if let Device::Cuda(i) = device {
        let n = tch::Cuda::device_count();
        if i as i64 >= n {
            return Err(ModelError::InvalidArgument {
                what: "device",
                value: format!("{s} (this machine has {n} CUDA device(s))"),
                expected: "an existing device: cpu, or cuda:N with N below the count",
            });
        }
    }
    Ok(device)
}

/// Parses a device list for a model split over devices: `cuda:0,cuda:1` (layers in contiguous
/// blocks in that order, the embeddings and head on the first). One entry is [`parse_device`]'s
/// single device. A CUDA device may appear once; `cpu` may repeat (`cpu,cpu` runs the split's
/// code path on one machine, for tests).
pub fn parse_devices(s: &str) -> Result<Vec<Device>> {
    let mut out: Vec<Device> = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(ModelError::InvalidArgument {
                what: "device list",
                value: s.into(),
                expected: "comma-separated devices without empty entries, e.g. cuda:0,cuda:1",
            });
        }
        let d = parse_device(part)?;
        if d.is_cuda() && out.contains(&d) {
            return Err(ModelError::InvalidArgument {
                what: "device list",
                value: format!("{s} ({part} twice)"),
                expected: "each CUDA device at most once",
            });
        }
        out.push(d);
    }
    Ok(out)
}

/// Parses `fp32`, `fp16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<Kind> {
    match s {
        "fp32" | "float32" => Ok(Kind::Float),
        "fp16" | "float16" => Ok(Kind::Half),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        _ => Err(ModelError::InvalidArgument {
            what: "dtype",
            value: s.into(),
            expected: "fp32, fp16 or bf16",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse_or_name_what_is_wrong() {
        assert_eq!(parse_devices("cpu").unwrap(), [Device::Cpu]);
        assert_eq!(parse_devices("cpu, cpu").unwrap(), [Device::Cpu, Device::Cpu]);
        for bad in ["", "cpu,", ",cpu", "cpu,,cpu"] {
            let e = parse_devices(bad).unwrap_err().to_string();
            assert!(e.contains("without empty entries"), "{bad:?}: {e}");
        }
        let e = parse_devices("cpu,gpu1").unwrap_err().to_string();
        assert!(e.contains("gpu1") && e.contains("cuda:N"), "{e}");
        // More CUDA devices than the machine has: the count is named.
        let n = tch::Cuda::device_count();
        let list = (0..=n).map(|i| format!("cuda:{i}")).collect::<Vec<_>>().join(",");
        let e = parse_devices(&list).unwrap_err().to_string();
        assert!(e.contains(&format!("cuda:{n}")) && e.contains(&format!("has {n} CUDA device(s)")), "{e}");
        if n >= 1 {
            let e = parse_devices("cuda:0,cuda:0").unwrap_err().to_string();
            assert!(e.contains("cuda:0 twice"), "{e}");
        }
    }
}
