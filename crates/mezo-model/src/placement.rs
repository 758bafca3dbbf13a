//! Where a model's tensors live when one device cannot hold it: decoder layers in contiguous
//! blocks, one block per device, balanced by parameter count (pipeline-style layer split, one
//! process, one forward at a time; no pipelining of micro-batches).
//!
//! The first device holds what surrounds the layers: the embeddings and the LM head. OPT and most
//! Llama-family checkpoints tie the head to `embed_tokens`, so the head can only run where the
//! embedding matrix is; the last hidden states travel back there (one `[rows, seq, width]`
//! activation, small beside the weights), which also makes the first device the one where a
//! model's inputs go and its outputs come from ([`crate::Model::device`]). Final norms and OPT's
//! `project_out` sit on the last layer's device, where the activation already is.

use std::fmt;

use tch::Device;

use crate::error::{ModelError, Result};
use crate::model::ModelConfig;

#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// The devices in order: the first holds the embeddings and the head.
    devices: Vec<Device>,
    /// For each decoder layer, its index into `devices` (non-decreasing).
    layers: Vec<usize>,
}

impl Placement {
    /// Everything on `device`.
    pub fn single(device: Device, layers: usize) -> Self {
        Placement { devices: vec![device], layers: vec![0; layers] }
    }

    /// Contiguous blocks of layers, one per device in order, that minimise the largest device's
    /// parameter count, where the first device also holds `first_extra` and the last `last_extra`.
    /// Every device gets at least one layer. Among equally balanced splits, the earliest devices
    /// take the most layers (deterministic).
    pub fn balanced(
        devices: &[Device],
        layer_params: &[i64],
        first_extra: i64,
        last_extra: i64,
    ) -> Result<Self> {
        let (k, n) = (devices.len(), layer_params.len());
        if k == 0 {
            return Err(ModelError::InvalidArgument {
                what: "device list",
                value: "none".into(),
                expected: "at least one device",
            });
        }
        if k > n {
            return Err(ModelError::InvalidArgument {
                what: "device list",
                value: format!("{k} devices for a model of {n} layers"),
                expected: "at most one device per decoder layer",
            });
        }
        // prefix[j] = parameters of layers 0..j.
        let mut prefix = vec![0i64; n + 1];
        for (j, p) in layer_params.iter().enumerate() {
            prefix[j + 1] = prefix[j] + p;
        }
        let load = |d: usize, from: usize, to: usize| {
            let mut l = prefix[to] - prefix[from];
            if d == 0 {
                l += first_extra;
            }
            if d == k - 1 {
                l += last_extra;
            }
            l
        };
        // best[d][j]: the smallest maximum load placing layers 0..j on devices 0..=d, each device
        // at least one layer; cut[d][j]: where device d's block starts in that placement.
        let mut best = vec![vec![i64::MAX; n + 1]; k];
        let mut cut = vec![vec![0usize; n + 1]; k];
        for (j, b) in best[0].iter_mut().enumerate().skip(1) {
            *b = load(0, 0, j);
        }
        for d in 1..k {
            for j in d + 1..=n {
                // Latest start first, so ties give earlier devices more layers.
                for i in (d..j).rev() {
                    let cost = best[d - 1][i].max(load(d, i, j));
                    if cost < best[d][j] {
                        best[d][j] = cost;
                        cut[d][j] = i;
                    }
                }
            }
        }
        let mut layers = vec![0usize; n];
        let mut end = n;
        for d in (1..k).rev() {
            let start = cut[d][end];
            layers[start..end].iter_mut().for_each(|l| *l = d);
            end = start;
        }
        Ok(Placement { devices: devices.to_vec(), layers })
    }

    /// The balanced placement of `config`'s layers over `devices`.
    pub fn for_model(config: &ModelConfig, devices: &[Device]) -> Result<Self> {
        let c = config.param_counts();
        if devices.len() == 1 {
            return Ok(Self::single(devices[0], c.layers.len()));
        }
        Self::balanced(devices, &c.layers, c.first, c.last)
    }

    /// Where the embeddings and the head are, the inputs go and the outputs come from.
    pub fn first(&self) -> Device {
        self.devices[0]
    }

    /// The device of the last layer (and of the final norm).
    pub fn last(&self) -> Device {
        self.layers.last().map_or(self.devices[0], |&d| self.devices[d])
    }

    /// The device of decoder layer `i`.
    pub fn layer(&self, i: usize) -> Device {
        self.devices[self.layers[i]]
    }

    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Whether the model spans several devices (also `[Cpu, Cpu]`, which runs the split's code
    /// path on one machine for tests).
    pub fn is_split(&self) -> bool {
        self.devices.len() > 1
    }

    /// Each device with the layers it holds (`start..end`), in order.
    pub fn blocks(&self) -> Vec<(Device, std::ops::Range<usize>)> {
        (0..self.devices.len())
            .map(|d| {
                let start = self.layers.iter().position(|&l| l == d).unwrap_or(0);
                let end = self.layers.iter().rposition(|&l| l == d).map_or(start, |e| e + 1);
                (self.devices[d], start..end)
            })
            .collect()
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .blocks()
            .into_iter()
            .map(|(d, r)| format!("{}: layers {}-{}", device_name(d), r.start, r.end.saturating_sub(1)))
            .collect();
        write!(f, "{}", parts.join("; "))
    }
}

/// `cpu` or `cuda:N`, as `--device` takes it.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Parameter counts by where they go: each decoder layer, what surrounds the layers on the first
/// device (embeddings, an untied head) and after them on the last (final norm, `project_out`).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamCounts {
    pub layers: Vec<i64>,
    pub first: i64,
    pub last: i64,
}

impl ParamCounts {
    pub fn total(&self) -> i64 {
        self.layers.iter().sum::<i64>() + self.first + self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(p: &Placement) -> Vec<usize> {
        p.blocks().iter().map(|(_, r)| r.len()).collect()
    }

    #[test]
    fn uniform_layers_split_evenly_and_the_embeddings_weigh_on_the_first_device() {
        let two = [Device::Cuda(0), Device::Cuda(1)];
        // OPT-66B: 64 layers of ~1.02e9, embeddings ~4.8e8 (under half a layer): 32/32.
        let p = Placement::balanced(&two, &[1_019_000_000; 64], 482_000_000, 18_432).unwrap();
        assert_eq!(counts(&p), [32, 32]);
        assert_eq!((p.first(), p.layer(31), p.layer(32), p.last()), (two[0], two[0], two[1], two[1]));
        assert_eq!(p.to_string(), "cuda:0: layers 0-31; cuda:1: layers 32-63");
        // Embeddings worth two layers: the first device takes two layers fewer.
        let p = Placement::balanced(&two, &[10; 8], 20, 0).unwrap();
        assert_eq!(counts(&p), [3, 5]);
        // An odd count: the earlier device takes the extra layer.
        let p = Placement::balanced(&two, &[10; 7], 0, 0).unwrap();
        assert_eq!(counts(&p), [4, 3]);
        let four = [Device::Cuda(0), Device::Cuda(1), Device::Cuda(2), Device::Cuda(3)];
        let p = Placement::balanced(&four, &[10; 10], 5, 0).unwrap();
        assert_eq!(counts(&p), [2, 3, 3, 2]);
        let max = p
            .blocks()
            .iter()
            .enumerate()
            .map(|(d, (_, r))| r.len() as i64 * 10 + if d == 0 { 5 } else { 0 })
            .max()
            .unwrap();
        assert_eq!(max, 30, "no split of 10 layers over 4 devices does better than 30");
    }

    #[test]
    fn uneven_layers_are_balanced_by_parameters_not_by_count() {
        let two = [Device::Cpu, Device::Cpu];
        let p = Placement::balanced(&two, &[50, 10, 10, 10, 10, 10], 0, 0).unwrap();
        assert_eq!(counts(&p), [1, 5]);
        // Blocks are contiguous and in device order.
        let l: Vec<usize> = (0..6).map(|i| p.layers[i]).collect();
        assert!(l.windows(2).all(|w| w[0] <= w[1]), "{l:?}");
    }

    #[test]
    fn bad_device_lists_are_refused() {
        let e = Placement::balanced(&[], &[1, 2], 0, 0).unwrap_err().to_string();
        assert!(e.contains("at least one device"), "{e}");
        let e = Placement::balanced(&[Device::Cpu; 3], &[1, 2], 0, 0).unwrap_err().to_string();
        assert!(e.contains("3 devices for a model of 2 layers"), "{e}");
    }

    #[test]
    fn a_single_device_holds_everything() {
        let p = Placement::single(Device::Cpu, 3);
        assert!(!p.is_split());
        assert_eq!((p.first(), p.last(), p.layer(2)), (Device::Cpu, Device::Cpu, Device::Cpu));
        assert_eq!(p.to_string(), "cpu: layers 0-2");
    }
}
