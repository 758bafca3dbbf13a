//! mezo's gRPC API, generated from `proto/mezo/v1` at build time: the public `MezoService`
//! (runs) and the internal `WorkerService` (coordinator <-> workers); and how callers reach it:
//! [`connect`] (TLS, the bearer token) and [`credentials`] (token and PEM files).

pub mod connect;
pub mod credentials;

pub mod v1 {
    tonic::include_proto!("mezo.v1");

    /// The encoded file descriptors, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mezo_descriptor");
}

#[cfg(test)]
mod tests {
    use super::v1::*;
    use prost::Message;

    #[test]
    fn run_spec_round_trips() {
        let spec = RunSpec {
            model: "m".into(),
            task: "sst2".into(),
            mode: Some(run_spec::Mode::Lora(LoraSpec { r: 8, alpha: 16.0, targets: vec!["q_proj".into()] })),
            steps: 10,
            split: WorkSplit::Data as i32,
            ..Default::default()
        };
        let bytes = spec.encode_to_vec();
        assert_eq!(RunSpec::decode(bytes.as_slice()).unwrap(), spec);
        assert!(!FILE_DESCRIPTOR_SET.is_empty());
    }
}
