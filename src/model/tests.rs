//! Model-level tests: the sparse, hand-differentiated step against candle's autograd on the dense
//! formulation; loss and KL by hand; lifelong β across save/load; checkpoints; growth; top-K.

use candle_core::{backprop::GradStore, Device, IndexOp, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::kernels::Bag;
use super::trainer::dropout_bag;
use super::*;

fn random_rows(n_users: usize, n_items: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n_users)
        .map(|_| {
            let n = rng.gen_range(1..n_items.min(12));
            let mut r: Vec<u32> = (0..n).map(|_| rng.gen_range(0..n_items as u32)).collect();
            r.sort_unstable();
            r.dedup();
            r
        })
        .collect()
}

fn small_config(hidden: Vec<usize>) -> ModelConfig {
    ModelConfig {
        mlp_hidden_size: hidden,
        latent_dimension: 4,
        batch_size: 7,
        ..Default::default()
    }
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let n = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    (d / n.max(1e-30)).sqrt()
}

/// The paper's loss on the dense input x̃ (an I-wide matmul), differentiated by candle.
fn dense_autograd(
    model: &MultiVae,
    rows: &[&[u32]],
    bag: &Bag,
    eps: &[f32],
    beta: f64,
) -> (f64, Vec<Tensor>) {
    let dev = Device::Cpu;
    let n = model.n_items();
    let b = rows.len();
    let d = model.config().latent_dimension;
    let vars: Vec<Var> = model
        .named_tensors()
        .iter()
        .map(|(_, t)| Var::from_tensor(&t.copy().unwrap()).unwrap())
        .collect();
    let mut xt = vec![0f32; b * n];
    for u in 0..b {
        for j in bag.offsets[u]..bag.offsets[u + 1] {
            xt[u * n + bag.items[j] as usize] += bag.weights[j];
        }
    }
    let xt = Tensor::from_vec(xt, (b, n), &dev).unwrap();
    let x = super::kernels::dense_rows(rows, None, n, &dev).unwrap();
    let n_enc = model.encoder.len();
    let n_dec = model.decoder.len();
    let mut h = xt;
    for k in 0..n_enc {
        let (w, bias) = (vars[2 * k].as_tensor(), vars[2 * k + 1].as_tensor());
        h = h.matmul(w).unwrap().broadcast_add(bias).unwrap();
        if k + 1 < n_enc {
            h = h.tanh().unwrap();
        }
    }
    let mu = h.narrow(1, 0, d).unwrap();
    let logvar = h.narrow(1, d, d).unwrap();
    let eps = Tensor::from_slice(eps, (b, d), &dev).unwrap();
    let z = (&mu + eps.mul(&(&logvar * 0.5).unwrap().exp().unwrap()).unwrap()).unwrap();
    let mut h = z;
    for k in 0..n_dec {
        let (w, bias) = (
            vars[2 * (n_enc + k)].as_tensor(),
            vars[2 * (n_enc + k) + 1].as_tensor(),
        );
        h = h.matmul(w).unwrap().broadcast_add(bias).unwrap();
        if k + 1 < n_dec {
            h = h.tanh().unwrap();
        }
    }
    let logp = candle_nn::ops::log_softmax(&h, 1).unwrap();
    let nll = (logp.mul(&x).unwrap().sum_all().unwrap() * (-1.0 / b as f64)).unwrap();
    let kl = ((logvar.exp().unwrap() - &logvar).unwrap() + mu.sqr().unwrap())
        .unwrap()
        .affine(0.5, -0.5)
        .unwrap()
        .sum_all()
        .unwrap()
        .affine(1.0 / b as f64, 0.0)
        .unwrap();
    let loss = (nll + (kl * beta).unwrap()).unwrap();
    let grads: GradStore = loss.backward().unwrap();
    let g = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).unwrap().clone())
        .collect();
    (loss.to_scalar::<f32>().unwrap() as f64, g)
}

#[test]
fn sparse_step_equals_dense_autograd() {
    for hidden in [vec![16], vec![16, 12]] {
        let config = small_config(hidden.clone());
        let trainer = Trainer::new(&config, 50, 3, &Device::Cpu).unwrap();
        let rows = random_rows(9, 50, 11);
        let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let bag = dropout_bag(&refs, None, 0.5, &mut rng);
        let eps: Vec<f32> = (0..9 * 4).map(|_| rng.gen_range(-2.0..2.0)).collect();
        let beta = 0.15;
        let (stats, grads) = trainer
            .loss_and_grads(&refs, None, bag.clone(), eps.clone(), beta)
            .unwrap();
        let mut dense = trainer.clone();
        dense.set_first_layer(FirstLayer::Dense);
        let (dstats, dgrads) = dense
            .loss_and_grads(&refs, None, bag.clone(), eps.clone(), beta)
            .unwrap();
        assert!((dstats.loss - stats.loss).abs() <= 1e-5 * stats.loss.abs());
        assert!(rel_err(&grads[0], &dgrads[0]) <= 1e-5);
        let (want_loss, want_grads) = dense_autograd(trainer.model(), &refs, &bag, &eps, beta);
        assert!(
            (stats.loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
            "{hidden:?}: loss {} vs {want_loss}",
            stats.loss
        );
        let names = trainer.model().named_tensors();
        assert_eq!(grads.len(), want_grads.len());
        for ((name, _), (g, w)) in names.iter().zip(grads.iter().zip(&want_grads)) {
            let e = rel_err(g, w);
            assert!(e <= 1e-5, "{hidden:?}: gradient of {name} differs by {e:e}");
        }
    }
}

/// A 3-item model with one hidden unit pair and a 1-d latent, weights set by hand, checked
/// against the loss and KL written out in plain arithmetic.
#[test]
fn loss_and_kl_by_hand() {
    let config = ModelConfig {
        mlp_hidden_size: vec![2],
        latent_dimension: 1,
        ..Default::default()
    };
    let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
    let named = [
        (
            "encoder.0.weight",
            t(&[0.1, -0.2, 0.3, 0.4, -0.5, 0.6], &[3, 2]),
        ),
        ("encoder.0.bias", t(&[0.01, -0.02], &[2])),
        ("encoder.1.weight", t(&[0.7, -0.3, 0.2, 0.5], &[2, 2])),
        ("encoder.1.bias", t(&[0.05, -0.1], &[2])),
        ("decoder.0.weight", t(&[0.9, -0.4], &[1, 2])),
        ("decoder.0.bias", t(&[0.0, 0.1], &[2])),
        (
            "decoder.1.weight",
            t(&[0.3, -0.6, 0.2, 0.8, 0.1, -0.7], &[2, 3]),
        ),
        ("decoder.1.bias", t(&[0.02, 0.0, -0.03], &[3])),
    ];
    let get = |n: &str| named.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone());
    let model = MultiVae::from_named(&config, 3, get).unwrap();
    let trainer = Trainer::from_parts(model, None, 0, 0, 0).unwrap();
    let rows: Vec<&[u32]> = vec![&[0, 2], &[1]];
    let bag = Bag::normalised(&rows);
    let eps = vec![0.5f32, -1.0];
    let beta = 0.2;
    let (stats, _) = trainer
        .loss_and_grads(&rows, None, bag, eps.clone(), beta)
        .unwrap();

    // by hand
    let w1 = [[0.1, -0.2], [0.3, 0.4], [-0.5, 0.6]];
    let b1 = [0.01, -0.02];
    let w2 = [[0.7, -0.3], [0.2, 0.5]];
    let b2 = [0.05, -0.1];
    let wd = [0.9, -0.4];
    let bd = [0.0, 0.1];
    let wo = [[0.3, -0.6, 0.2], [0.8, 0.1, -0.7]];
    let bo = [0.02, 0.0, -0.03];
    let mut nll = 0.0f64;
    let mut kl = 0.0f64;
    for (u, row) in rows.iter().enumerate() {
        let s = 1.0 / (row.len() as f64).sqrt();
        let mut h = [b1[0], b1[1]];
        for &i in *row {
            for j in 0..2 {
                h[j] += s * w1[i as usize][j];
            }
        }
        let a = [f64::tanh(h[0]), f64::tanh(h[1])];
        let mu = a[0] * w2[0][0] + a[1] * w2[1][0] + b2[0];
        let lv = a[0] * w2[0][1] + a[1] * w2[1][1] + b2[1];
        kl += 0.5 * (-lv + lv.exp() + mu * mu - 1.0);
        let z = mu + eps[u] as f64 * (0.5 * lv).exp();
        let g = [f64::tanh(z * wd[0] + bd[0]), f64::tanh(z * wd[1] + bd[1])];
        let logits: Vec<f64> = (0..3)
            .map(|i| g[0] * wo[0][i] + g[1] * wo[1][i] + bo[i])
            .collect();
        let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
        for &i in *row {
            nll -= logits[i as usize] - lse;
        }
    }
    nll /= 2.0;
    kl /= 2.0;
    assert!((stats.nll - nll).abs() < 1e-5, "nll {} vs {nll}", stats.nll);
    assert!((stats.kl - kl).abs() < 1e-5, "kl {} vs {kl}", stats.kl);
    assert!((stats.loss - (nll + beta * kl)).abs() < 1e-5);
    assert_eq!(stats.beta, beta);
}

fn train_data() -> Interactions {
    Interactions::from_rows(random_rows(40, 30, 21), 30).unwrap()
}

fn params(t: &Trainer) -> Vec<Vec<f32>> {
    t.model()
        .named_tensors()
        .iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn save_load_continue_equals_straight_through_and_beta_continues() {
    let config = ModelConfig {
        total_anneal_steps: 10,
        ..small_config(vec![8])
    };
    let data = train_data();
    let mut straight = Trainer::new(&config, 30, 9, &Device::Cpu).unwrap();
    for _ in 0..4 {
        straight.train_epoch(&data, |_| {}).unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let store = Checkpoints::new(dir.path());
    let mut first = Trainer::new(&config, 30, 9, &Device::Cpu).unwrap();
    let mut betas = Vec::new();
    for _ in 0..2 {
        first.train_epoch(&data, |s| betas.push(s.beta)).unwrap();
    }
    let saved = store
        .save(&first, 1, serde_json::json!({"loss": 1.0}), None, None)
        .unwrap();
    assert_eq!(saved.update_count, 12); // 40 users / 7 per batch = 6 steps per epoch
    assert_eq!(saved.beta, 0.2f64.min(12.0 / 10.0));
    drop(first);
    let (mut resumed, manifest) = Checkpoints::load(&store.path_of(1), &Device::Cpu).unwrap();
    assert_eq!(manifest, saved);
    assert_eq!(resumed.update_count(), 12);
    for _ in 0..2 {
        resumed.train_epoch(&data, |s| betas.push(s.beta)).unwrap();
    }
    // β grows 0, 0.1, … up to the cap, never restarting at 0 after the reload
    assert_eq!(betas[0], 0.0);
    assert!((betas[1] - 0.1).abs() < 1e-12);
    assert!(betas[12..].iter().all(|&b| b == 0.2));
    assert_eq!(resumed.update_count(), straight.update_count());
    assert_eq!(
        params(&resumed),
        params(&straight),
        "resumed training diverged"
    );
}

#[test]
fn training_is_reproducible_and_learns() {
    let config = small_config(vec![16]);
    let data = train_data();
    let run = || {
        let mut t = Trainer::new(&config, 30, 4, &Device::Cpu).unwrap();
        let first = t.train_epoch(&data, |_| {}).unwrap();
        let mut last = first;
        for _ in 0..60 {
            last = t.train_epoch(&data, |_| {}).unwrap();
        }
        (params(&t), first.nll, last.nll)
    };
    let (a, first, last) = run();
    let (b, _, _) = run();
    assert_eq!(a, b);
    assert!(last < first * 0.95, "nll did not fall: {first} -> {last}");
}

#[test]
fn corrupt_truncated_and_foreign_checkpoints_are_refused() {
    let config = small_config(vec![8]);
    let dir = tempfile::tempdir().unwrap();
    let store = Checkpoints::new(dir.path());
    let mut t = Trainer::new(&config, 30, 1, &Device::Cpu).unwrap();
    store
        .save(&t, 1, serde_json::Value::Null, None, None)
        .unwrap();
    t.train_epoch(&train_data(), |_| {}).unwrap();
    for v in 2..=4 {
        store
            .save(&t, v, serde_json::Value::Null, None, None)
            .unwrap();
    }
    assert!(matches!(
        store.save(&t, 4, serde_json::Value::Null, None, None),
        Err(CheckpointError::Exists { .. })
    ));

    // v4: truncated weights
    let w4 = store.path_of(4).join("weights.safetensors");
    let bytes = std::fs::read(&w4).unwrap();
    std::fs::write(&w4, &bytes[..bytes.len() / 2]).unwrap();
    let e = Checkpoints::load(&store.path_of(4), &Device::Cpu).unwrap_err();
    assert!(matches!(e, CheckpointError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
    // v3: one flipped byte
    let w3 = store.path_of(3).join("weights.safetensors");
    let mut bytes = std::fs::read(&w3).unwrap();
    let mid = bytes.len() - 100;
    bytes[mid] ^= 0x40;
    std::fs::write(&w3, &bytes).unwrap();
    let e = Checkpoints::load(&store.path_of(3), &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    // v2: a foreign manifest
    std::fs::write(
        store.path_of(2).join("manifest.json"),
        br#"{"format": "pytorch"}"#,
    )
    .unwrap();
    let e = Checkpoints::load(&store.path_of(2), &Device::Cpu).unwrap_err();
    assert!(matches!(e, CheckpointError::Foreign { .. }), "{e}");
    // a manifest that is not JSON at all
    std::fs::write(store.path_of(2).join("manifest.json"), b"\x00\x01garbage").unwrap();
    assert!(Checkpoints::load(&store.path_of(2), &Device::Cpu).is_err());

    // the newest loadable version is v1
    let mut skipped = Vec::new();
    let (_, m) = store
        .load_latest(&Device::Cpu, |v, _| skipped.push(v))
        .unwrap()
        .unwrap();
    assert_eq!(m.model_version, 1);
    assert_eq!(skipped, vec![4, 3, 2]);

    // roll back to v1: newer versions are moved aside, not deleted
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = Checkpoints::new(dir2.path());
    for v in 1..=3 {
        store2
            .save(&t, v, serde_json::Value::Null, None, None)
            .unwrap();
    }
    assert_eq!(store2.rollback(1).unwrap(), vec![2, 3]);
    assert_eq!(store2.versions().unwrap(), vec![1]);
    // the numbers moved aside are never given again, even once their directories are pruned
    assert_eq!(store2.highest_version_ever().unwrap(), 3);
    store2.prune(1).unwrap();
    let aside = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir2.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".rolled-back-"))
            .map(|e| e.path())
            .collect()
    };
    assert_eq!(
        aside().len(),
        1,
        "all but keep = 1 moved-aside versions pruned"
    );
    std::fs::remove_dir_all(&aside()[0]).unwrap();
    assert_eq!(
        store2.highest_version_ever().unwrap(),
        3,
        "recorded before pruning"
    );
    assert!(
        store.rollback(3).is_err(),
        "v3 is corrupt: no rollback to it"
    );

    assert_eq!(store.prune(2).unwrap(), vec![1, 2]);
    assert_eq!(store.versions().unwrap(), vec![3, 4]);
}

#[test]
fn growth_keeps_old_logits_and_training_continues() {
    let config = small_config(vec![16]);
    let data = train_data();
    let mut t = Trainer::new(&config, 30, 2, &Device::Cpu).unwrap();
    t.train_epoch(&data, |_| {}).unwrap();
    let rows = random_rows(10, 30, 99);
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let before = t.model().scores(&refs).unwrap();
    t.grow(45).unwrap();
    assert_eq!(t.model().n_items(), 45);
    let after = t.model().scores(&refs).unwrap();
    assert_eq!(after.dims(), &[10, 45]);
    let old = after.narrow(1, 0, 30).unwrap();
    let diff = (old - &before)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff <= 1e-6, "old logits moved by {diff}");

    let mut wide = Interactions::from_rows(random_rows(40, 45, 5), 45).unwrap();
    wide.set_n_items(45);
    let s = t.train_epoch(&wide, |_| {}).unwrap();
    assert!(s.loss.is_finite());
    // a checkpoint of the grown model round-trips
    let dir = tempfile::tempdir().unwrap();
    let store = Checkpoints::new(dir.path());
    store
        .save(&t, 7, serde_json::Value::Null, None, None)
        .unwrap();
    let (back, m) = Checkpoints::load(&store.path_of(7), &Device::Cpu).unwrap();
    assert_eq!(m.n_items, 45);
    assert_eq!(params(&back), params(&t));
}

#[test]
fn recommendations_never_contain_seen_items() {
    let config = small_config(vec![16]);
    let data = train_data();
    let mut t = Trainer::new(&config, 30, 2, &Device::Cpu).unwrap();
    for _ in 0..5 {
        t.train_epoch(&data, |_| {}).unwrap();
    }
    let rows: Vec<&[u32]> = data.rows().collect();
    let recs = t.model().recommend(&rows, 10).unwrap();
    let scores = t.model().scores(&rows).unwrap().to_vec2::<f32>().unwrap();
    for ((row, rec), s) in rows.iter().zip(&recs).zip(&scores) {
        assert_eq!(rec.len(), 10.min(30 - row.len()));
        for (i, score) in rec {
            assert!(row.binary_search(i).is_err(), "recommended a seen item {i}");
            assert!((s[*i as usize] - score).abs() < 1e-5);
        }
        for w in rec.windows(2) {
            assert!(w[0].1 >= w[1].1);
        }
    }
}

/// The composed kernels (the code path CUDA runs) train the same model as the host kernels:
/// same losses and parameters after several epochs, up to float rounding (the host tanh is a
/// rational approximation within 1e-6).
#[test]
fn device_code_path_trains_like_the_host_path() {
    for hidden in [vec![16], vec![16, 12]] {
        let config = small_config(hidden);
        let data = train_data();
        let run = || {
            let mut t = Trainer::new(&config, 30, 5, &Device::Cpu).unwrap();
            let mut nll = Vec::new();
            for _ in 0..5 {
                nll.push(t.train_epoch(&data, |_| {}).unwrap().nll);
            }
            let rows: Vec<&[u32]> = data.rows().collect();
            let scores = t.model().scores(&rows).unwrap();
            (params(&t), nll, scores)
        };
        let (host_params, host_nll, host_scores) = run();
        let (dev_params, dev_nll, dev_scores) = kernels::with_composed_kernels(run);
        for (a, b) in host_nll.iter().zip(&dev_nll) {
            assert!((a - b).abs() <= 1e-4 * a.abs(), "nll {a} vs {b}");
        }
        for (a, b) in host_params.iter().zip(&dev_params) {
            let a = Tensor::new(a.as_slice(), &Device::Cpu).unwrap();
            let b = Tensor::new(b.as_slice(), &Device::Cpu).unwrap();
            assert!(
                rel_err(&b, &a) < 1e-4,
                "parameters differ: {}",
                rel_err(&b, &a)
            );
        }
        assert!(rel_err(&dev_scores, &host_scores) < 1e-4);
    }
}

#[test]
fn a_serving_copy_recommends_what_the_model_does() {
    let cfg = ModelConfig {
        mlp_hidden_size: vec![40],
        latent_dimension: 8,
        ..ModelConfig::default()
    };
    let t = Trainer::new(&cfg, 700, 3, &Device::Cpu).unwrap();
    let serving = t.model().for_serving().unwrap();
    let rows: Vec<Vec<u32>> = (0..300u32)
        .map(|u| {
            let mut r: Vec<u32> = (0..(u % 9 + 1))
                .map(|j| (u * 131 + j * 397) % 700)
                .collect();
            r.sort_unstable();
            r.dedup();
            r
        })
        .collect();
    // small batches take the transposed path, 300 users the plain GEMM
    for b in [1usize, 7, 64, 65, 300] {
        let rr: Vec<&[u32]> = rows[..b].iter().map(|r| r.as_slice()).collect();
        let want = t.model().recommend(&rr, 20).unwrap();
        let got = serving.recommend(&rr, 20).unwrap();
        for (w, g) in want.iter().zip(&got) {
            let wi: Vec<u32> = w.iter().map(|x| x.0).collect();
            let gi: Vec<u32> = g.iter().map(|x| x.0).collect();
            assert_eq!(wi, gi, "batch of {b}");
            for (a, e) in w.iter().zip(g) {
                assert!((a.1 - e.1).abs() < 1e-4, "batch of {b}: {} vs {}", a.1, e.1);
            }
        }
    }
}

/// The weighted likelihood: weights of 1 are the binary one, doubling every weight doubles it,
/// and a weighted model's input reads the weights (scores move with them).
#[test]
fn weighted_nll_scales_with_the_weights_and_the_input_reads_them() {
    let rows = random_rows(20, 30, 5);
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let t = Trainer::new(&small_config(vec![16]), 30, 1, &Device::Cpu).unwrap();
    let m = t.model();
    let ones: Vec<Vec<f32>> = rows.iter().map(|r| vec![1.0; r.len()]).collect();
    let twos: Vec<Vec<f32>> = rows.iter().map(|r| vec![2.0; r.len()]).collect();
    let skewed: Vec<Vec<f32>> = rows
        .iter()
        .map(|r| (0..r.len()).map(|j| 1.0 + j as f32).collect())
        .collect();
    fn w(v: &[Vec<f32>]) -> Vec<&[f32]> {
        v.iter().map(|r| r.as_slice()).collect()
    }
    let binary = m.mean_nll(&refs, None).unwrap();
    let one = m.mean_nll(&refs, Some(&w(&ones))).unwrap();
    let two = m.mean_nll(&refs, Some(&w(&twos))).unwrap();
    assert!((binary - one).abs() < 1e-6 * binary, "{binary} vs {one}");
    // the input is normalised (w/‖w‖: the same for 1s and 2s), the target is not
    assert!((two - 2.0 * one).abs() < 1e-5 * two, "{two} vs 2 × {one}");
    let plain = m
        .recommend_weighted(&refs, Some(&w(&ones)), &[], 5)
        .unwrap();
    assert_eq!(plain, m.recommend(&refs, 5).unwrap());
    let moved = m
        .recommend_weighted(&refs, Some(&w(&skewed)), &[], 5)
        .unwrap();
    assert_ne!(plain, moved, "weights change the encoder's input");
}

/// A serving copy that scores in int8 (where the CPU can) publishes what the exact copy does:
/// the same top 10 for nearly every user, exact scores (re-ranked in fp32), never a seen or
/// hidden item. A catalogue below the int8 minimum is scored exactly.
#[test]
fn an_int8_serving_copy_ranks_as_the_exact_one() {
    let items = INT8_MIN_ITEMS + 904;
    let cfg = ModelConfig {
        mlp_hidden_size: vec![64],
        latent_dimension: 16,
        batch_size: 100,
        ..ModelConfig::default()
    };
    // users in 50 taste groups of 100 items, trained a little so the scores have structure
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let rows: Vec<Vec<u32>> = (0..600)
        .map(|u| {
            let g = (u % 50) as u32 * 100;
            let mut r: Vec<u32> = (0..rng.gen_range(3..15))
                .map(|_| g + rng.gen_range(0..100))
                .collect();
            r.sort_unstable();
            r.dedup();
            r
        })
        .collect();
    let data = Interactions::from_rows(rows.iter().map(|r| r.iter().copied()), items).unwrap();
    let mut t = Trainer::new(&cfg, items, 5, &Device::Cpu).unwrap();
    t.train_epoch(&data, |_| {}).unwrap();
    let exact = t.model().for_serving_with(Scoring::Exact).unwrap();
    let int8 = t.model().for_serving_with(Scoring::Int8).unwrap();
    let refs: Vec<&[u32]> = rows.iter().map(|r| r.as_slice()).collect();
    let hidden = [1u32, 7, 250];
    let want = exact.recommend_weighted(&refs, None, &hidden, 20).unwrap();
    let got = int8.recommend_weighted(&refs, None, &hidden, 20).unwrap();
    // a serving replica's smallest batches take the catalogue split (with more than one
    // thread): the same candidates, so the same lists
    let in_small_batches: Vec<Vec<(u32, f32)>> = refs
        .chunks(7)
        .flat_map(|c| int8.recommend_weighted(c, None, &hidden, 20).unwrap())
        .collect();
    assert!(got == in_small_batches, "small batches rank differently");
    let mut same = 0;
    for ((w, g), seen) in want.iter().zip(&got).zip(&rows) {
        assert_eq!(g.len(), 20);
        for &(i, s) in g {
            assert!(seen.binary_search(&i).is_err() && !hidden.contains(&i));
            let e = exact
                .scores(&[seen.as_slice()])
                .unwrap()
                .i((0, i as usize))
                .unwrap();
            let e = e.to_scalar::<f32>().unwrap();
            assert!((s - e).abs() < 1e-4, "item {i}: {s} vs exact {e}");
        }
        same += usize::from(w[..10].iter().map(|x| x.0).eq(g[..10].iter().map(|x| x.0)));
    }
    assert!(
        same * 100 >= 99 * rows.len(),
        "{same} of {} top 10s",
        rows.len()
    );
    if int8_supported() {
        assert!(
            int8.int8_enabled(),
            "the int8 pass is on where the CPU has it"
        );
    }
    let small = Trainer::new(&cfg, INT8_MIN_ITEMS - 1, 5, &Device::Cpu).unwrap();
    assert!(!small
        .model()
        .for_serving_with(Scoring::Int8)
        .unwrap()
        .int8_enabled());
}
