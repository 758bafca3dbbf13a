//! A safetensors checkpoint is mapped, not read, when it loads: the host memory a model's load
//! needs is about one tensor at a time, not the whole model (which for OPT-66B is 123 GiB). Its
//! own test binary, so no other test's allocations move the resident-set readings.

use mezo_model::checkpoint::Checkpoint;
use tch::{Device, Kind, Tensor};

/// This process's resident set in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn a_safetensors_checkpoint_is_read_tensor_by_tensor() {
    let dir = std::env::temp_dir().join(format!("mezo-lazy-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Four 64 MiB float32 tensors, each filled with its index.
    let n = 16 << 20;
    let names: Vec<String> = (0..4).map(|i| format!("model.decoder.layers.{i}.fc1.weight")).collect();
    {
        let tensors: Vec<(String, Tensor)> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                (name.clone(), Tensor::full([n / 1024, 1024], i as f64, (Kind::Float, Device::Cpu)))
            })
            .collect();
        Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
    }
    let file_bytes = std::fs::metadata(dir.join("model.safetensors")).unwrap().len();
    assert!(file_bytes >= 256 << 20);

    let before = rss();
    let mut ckpt = Checkpoint::load(&dir).unwrap();
    let grown = rss().saturating_sub(before);
    assert!(grown < 16 << 20, "loading took {grown} bytes of a {file_bytes}-byte checkpoint");
    assert!(names.iter().all(|n| ckpt.contains(n)));

    for (i, name) in names.iter().enumerate() {
        let t = ckpt.take(name, &[n / 1024, 1024]).unwrap();
        assert_eq!(t.kind(), Kind::Float);
        let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
        assert_eq!((lo, hi), (i as f64, i as f64), "{name}");
    }
    // A shape that does not match is refused before any byte is read, naming the tensor.
    let mut again = Checkpoint::load(&dir).unwrap();
    let e = again.take(&names[0], &[4, 4]).unwrap_err().to_string();
    assert!(e.contains(&names[0]) && e.contains("[4, 4]"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A sharded checkpoint reads a shard when a tensor of it is first taken: a damaged second shard
/// does not stop the first shard's tensors, and is reported, by file, once one of its own is
/// taken. A shard that lacks a tensor the index places in it is reported by name.
#[test]
fn shards_are_read_when_their_tensors_are_taken() {
    let dir = std::env::temp_dir().join(format!("mezo-lazy-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let t = |v: f64| Tensor::full([3, 2], v, (Kind::Float, Device::Cpu));
    let (a, b) = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors");
    Tensor::write_safetensors(&[("x.0", t(0.0)), ("x.1", t(1.0))], dir.join(a)).unwrap();
    Tensor::write_safetensors(&[("x.2", t(2.0))], dir.join(b)).unwrap();
    let index = serde_json::json!({"weight_map": {"x.0": a, "x.1": a, "x.2": b, "x.3": a}});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let mut ckpt = Checkpoint::load(&dir).unwrap();
    std::fs::write(dir.join(b), b"not a safetensors file").unwrap();
    // x.3 is indexed in the first shard, which lacks it: named when that shard is read.
    let e = ckpt.take("x.0", &[3, 2]).unwrap_err().to_string();
    assert!(e.contains("x.3") && e.contains(a), "{e}");

    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": {"x.0": a, "x.1": a, "x.2": b}}).to_string(),
    )
    .unwrap();
    let mut ckpt = Checkpoint::load(&dir).unwrap();
    for (name, v) in [("x.0", 0.0), ("x.1", 1.0)] {
        assert_eq!(ckpt.take(name, &[3, 2]).unwrap().max().double_value(&[]), v, "{name}");
    }
    let e = ckpt.take("x.2", &[3, 2]).unwrap_err().to_string();
    assert!(e.contains(b) && e.contains("corrupt"), "{e}");

    // A shard that is not there at all is reported when the checkpoint opens.
    std::fs::remove_file(dir.join(b)).unwrap();
    let e = Checkpoint::load(&dir).err().expect("a missing shard").to_string();
    assert!(e.contains(b), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
