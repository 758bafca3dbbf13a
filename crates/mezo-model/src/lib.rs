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
