//! The CUDA kernels: compiled to PTX by NVRTC (no GPU needed; skips, saying why, where NVRTC
//! is not installed), and every op run against the CPU op on the CPU emulator (always: it
//! needs only g++) and on a GPU when there is one.
#![cfg(feature = "cuda")]

/// Every source compiled to sm_90 PTX by NVRTC; None (saying SKIPPED and why) where NVRTC is
/// not installed.
fn hopper_ptx() -> Option<Vec<(&'static str, String)>> {
    match gated_lm::backend::cuda::compile_all("sm_90") {
        Ok(p) => Some(p),
        Err(e) if format!("{e}").contains("was not found") => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("{e:#}"),
    }
}

#[test]
fn every_kernel_compiles_to_ptx_for_hopper() {
    let Some(ptx) = hopper_ptx() else { return };
    let sources = gated_lm::backend::cuda::ops::SOURCES;
    assert_eq!(ptx.len(), sources.len());
    for ((name, text), src) in ptx.iter().zip(sources) {
        assert_eq!(*name, src.name);
        assert!(text.contains(".target sm_90"), "{name}: not compiled for sm_90");
        for e in src.entries {
            assert!(
                text.contains(&format!(".entry {e}(")),
                "{name}.cu: no kernel {e} in the PTX"
            );
        }
    }
}

/// The PTX kept on disk for the next process is what this one compiled, under a name that
/// changes with the text, the architecture and NVRTC's version (a stale file is never read).
#[test]
fn compiled_ptx_is_cached_under_its_inputs() {
    use gated_lm::backend::cuda::ptx::cache_path;
    let Some(ptx) = hopper_ptx() else { return };
    let dir = std::env::temp_dir().join("gated-lm-ptx");
    let src = &ops::SOURCES[0];
    let version = gated_lm::backend::cuda::ptx::nvrtc_version().unwrap();
    let hit = cache_path(&dir, src.name, src.text, "sm_90", version);
    assert_eq!(std::fs::read_to_string(&hit).unwrap(), ptx[0].1);
    for (name, text, arch) in [
        (src.name, &format!("{} ", src.text)[..], "sm_90"),
        (src.name, src.text, "sm_80"),
    ] {
        let v = (12, 9);
        assert_ne!(
            cache_path(&dir, name, text, arch, v),
            cache_path(&dir, src.name, src.text, "sm_90", v)
        );
    }
    let p = |v| cache_path(&dir, src.name, src.text, "sm_90", v);
    assert_ne!(p((12, 9)), p((12, 8)));
    assert_eq!(p((12, 9)), p((12, 9)));
}

/// The lengths of the runs of f32 global loads between global stores in `entry`'s PTX.
fn load_runs(ptx: &[(&'static str, String)], source: &str, entry: &str) -> Vec<usize> {
    let (_, text) = ptx.iter().find(|(n, _)| *n == source).unwrap();
    let body = text.split(&format!(".entry {entry}(")).nth(1).unwrap();
    let body = &body[..body.find("\n}").unwrap()];
    let ops: Vec<&str> = body
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|op| op.starts_with("ld.global.f32") || op.starts_with("st.global"))
        .collect();
    ops.split(|op| op.starts_with("st."))
        .map(|run| run.len())
        .filter(|&n| n > 0)
        .collect()
}

/// Kernels bound by DRAM must issue their loads together, before their stores. The compiler
/// must assume pointers from a table or to other buffers may alias, so a load written after a
/// store waits for it: AdamW read m[i] back after storing it and p[i] after storing v[i] (three
/// round trips per element instead of one), and the RMSNorm backward's second pass read each
/// column's dx (accumulated, so from DRAM) only after the previous column's stores, as the
/// attention's pre-pass its o, z and dy. In the PTX: AdamW's runs of f32 loads are its four
/// operands (or more); the norm backward's at least x, dy and dx of 4 columns; the pre-pass's
/// at least o and dy of 4 columns; the cross-entropy's (whose gradient pass may write over the
/// logits it reads) 8 columns of logits; the embedding's gather 4 columns of its row.
#[test]
fn bandwidth_bound_kernels_issue_their_loads_before_their_stores() {
    let Some(ptx) = hopper_ptx() else { return };
    for (source, entry, least) in [
        ("optim", "adamw_multi", 4),
        ("rmsnorm", "rmsnorm_bwd", 12),
        ("rmsnorm", "rmsnorm_bwd_bf16", 12),
        ("attention", "attn_bwd_pre", 8),
        ("attention", "attn_bwd_pre_tc_bf16oz", 8),
        ("cross_entropy", "cross_entropy_fwd_bwd", 8),
        ("cross_entropy", "cross_entropy_fwd_bwd_bf16", 8),
        ("embedding", "embed_fwd", 4),
    ] {
        let runs = load_runs(&ptx, source, entry);
        assert!(!runs.is_empty(), "{entry}: no loads");
        assert!(
            runs.iter().all(|&n| n >= least),
            "{entry}: runs of f32 loads between stores {runs:?}"
        );
    }
}

/// ptxas (the CUDA assembler, from the `nvidia-cuda-nvcc-cu12` wheel: `.ci/run` installs it and
/// sets GATED_LM_PTXAS) assembles every kernel for sm_90, and none spills registers to local
/// memory, which on a GPU turns register reads in the inner loops into memory traffic; the
/// tensor-core attention kernels also keep no stack frame (an array of buffer pointers indexed at
/// run time lands there). attention.cu's f32 CUDA-core kernels (f32 precision, head_dim 16/32:
/// not the fast path) are exempt: they spill today. Prints each kernel's registers, stack and
/// spills (`--nocapture`). Skips, saying why, without ptxas or NVRTC.
#[test]
fn no_kernel_spills_registers_on_hopper() {
    let Some(ptxas) = std::env::var_os("GATED_LM_PTXAS") else {
        eprintln!("SKIPPED: GATED_LM_PTXAS is not set (the path of a ptxas binary)");
        return;
    };
    let Some(ptx) = hopper_ptx() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (name, text) in &ptx {
        let src = dir.path().join(format!("{name}.ptx"));
        std::fs::write(&src, text).unwrap();
        let out = std::process::Command::new(&ptxas)
            .args(["-arch=sm_90", "-v", "-o"])
            .arg(dir.path().join(format!("{name}.cubin")))
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.to_string_lossy()));
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "ptxas on {name}.ptx: {log}");
        // per function: "Function properties for X", then "N bytes stack frame, S bytes spill
        // stores, L bytes spill loads", then "Used R registers, ..."
        let (mut entry, mut bytes) = ("", Vec::<u64>::new());
        for line in log.lines() {
            if let Some(rest) = line.split("Function properties for ").nth(1) {
                entry = rest.trim();
                continue;
            }
            if let Some(used) = line.split("Used ").nth(1) {
                let regs = used.split(' ').next().unwrap_or("?");
                eprintln!("ptxas sm_90 {name}.cu {entry}: {regs} registers, stack/spill stores/loads {bytes:?} B");
                continue;
            }
            let Some((stack, spills)) = line.trim().split_once(" bytes stack frame, ") else {
                continue;
            };
            bytes = std::iter::once(stack)
                .chain(spills.split(", "))
                .filter_map(|f| f.split(' ').next()?.parse().ok())
                .collect();
            assert_eq!(bytes.len(), 3, "{name}.cu {entry}: unparsed ptxas line {line:?}");
            checked += ops::SOURCES.iter().any(|s| s.entries.contains(&entry)) as usize;
            if *name == "attention" {
                continue;
            }
            assert_eq!(bytes[1..], [0, 0], "{name}.cu {entry}: spills registers ({line})");
            if *name == "attention_tc" && entry.starts_with("attn_") {
                assert_eq!(bytes[0], 0, "{name}.cu {entry}: a stack frame ({line})");
            }
        }
    }
    let entries: usize = ops::SOURCES.iter().map(|s| s.entries.len()).sum();
    assert_eq!(checked, entries, "ptxas reported {checked} of {entries} kernels");
}

use gated_lm::backend::cuda::ops;
use gated_lm::backend::cuda::runtime::{down_f32, down_u16, up_f32, up_i32, up_u16, zeros_f32, Arg, Device, Launch};

mod common;
use common::cuda_devices as devices;
mod cuda_tensor_core;

fn randn(n: usize, seed: u64, std: f64) -> Vec<f32> {
    let mut r = gated_lm::rng::Rng::new(seed);
    (0..n).map(|_| (r.normal() * std) as f32).collect()
}

fn close(what: &str, got: &[f32], cpu: &[f32], rel: f32) {
    assert_eq!(got.len(), cpu.len(), "{what}");
    let scale = cpu.iter().fold(1e-6f32, |a, x| a.max(x.abs()));
    let (i, err) = got
        .iter()
        .zip(cpu)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0f32), |m, (i, e)| if e > m.1 || e.is_nan() { (i, e) } else { m });
    assert!(
        err <= rel * scale,
        "{what}: device and CPU differ by {err} at {i} ({} vs {}; scale {scale})",
        got[i],
        cpu[i]
    );
}

#[test]
fn elementwise_ops_match_the_cpu_ops() {
    for dev in devices() {
        let dev = dev.as_ref();
        eprintln!("device: {}", dev.describe());
        // SwiGLU on the stacked [gate; up] GEMM's output: each row's ff gate values, then its
        // ff up values; ff 81 one element at a time, 88 four f32 (16 bytes) at a time
        for ff in [81, 88] {
            swiglu_matches_the_cpu_op(dev, 37, ff);
        }
    }
}

fn swiglu_matches_the_cpu_op(dev: &dyn Device, rows: usize, ff: usize) {
    use gated_lm::model::ops::swiglu;
    let on = format!("ff {ff} on {}", dev.describe());
    let n = rows * ff;
    let (g, u, dm) = (randn(n, 1, 2.0), randn(n, 2, 1.0), randn(n, 3, 1.0));
    let stack = |a: &[f32], b: &[f32]| -> Vec<f32> {
        a.chunks(ff)
            .zip(b.chunks(ff))
            .flat_map(|(x, y)| x.iter().chain(y).copied())
            .collect()
    };
    let (gub, dmb) = (up_f32(dev, &stack(&g, &u)).unwrap(), up_f32(dev, &dm).unwrap());
    let mut m = vec![0.0; n];
    swiglu::swiglu_fwd(&g, &u, &mut m);
    let mb = zeros_f32(dev, n).unwrap();
    ops::swiglu_fwd(dev, (&gub).into(), (&mb).into(), rows, ff).unwrap();
    close(&format!("swiglu_fwd, {on}"), &down_f32(dev, &mb).unwrap(), &m, 1e-5);
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    swiglu::swiglu_bwd(&g, &u, &dm, &mut dg, &mut du);
    let (dgub, m2) = (zeros_f32(dev, 2 * n).unwrap(), zeros_f32(dev, n).unwrap());
    let outs = ((&dgub).into(), (&m2).into());
    ops::swiglu_bwd(dev, (&gub).into(), (&dmb).into(), outs, rows, ff).unwrap();
    close(
        &format!("swiglu_bwd [dg, du], {on}"),
        &down_f32(dev, &dgub).unwrap(),
        &stack(&dg, &du),
        1e-5,
    );
    // the backward writes m again for the down weight's gradient: the forward's bit for bit
    let bits = |b| {
        down_f32(dev, b)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&m2), bits(&mb), "swiglu_bwd's m, {on}");
    // a grid of 128 threads, so each thread walks many elements (or packs), its row and column
    // stepped by the stride's (128 elements = 1 row + 47 columns of 81; 128 packs of 4 = 5 rows
    // + 18 packs of 22: carries into the row): each element's math does not depend on the
    // grid, so bit for bit the same outputs
    let small = Launch::linear(2, 64);
    let (m3, dgu3, m4) = (
        zeros_f32(dev, n).unwrap(),
        zeros_f32(dev, 2 * n).unwrap(),
        zeros_f32(dev, n).unwrap(),
    );
    let nf = [Arg::I64(n as i64), Arg::I32(ff as i32)];
    dev.launch("swiglu_fwd", small, &[gub.arg(), m3.arg(), nf[0], nf[1]])
        .unwrap();
    dev.launch(
        "swiglu_bwd",
        small,
        &[gub.arg(), dmb.arg(), dgu3.arg(), m4.arg(), nf[0], nf[1]],
    )
    .unwrap();
    assert_eq!(bits(&m3), bits(&mb), "swiglu_fwd on a small grid, {on}");
    assert_eq!(bits(&dgu3), bits(&dgub), "swiglu_bwd's dgu on a small grid, {on}");
    assert_eq!(bits(&m4), bits(&mb), "swiglu_bwd's m on a small grid, {on}");
}

#[test]
fn row_ops_match_the_cpu_ops() {
    use gated_lm::config::NormStyle;
    use gated_lm::model::ops::{cross_entropy as ce, rmsnorm};
    for dev in devices() {
        let dev = dev.as_ref();
        let (rows, d) = (37, 300);
        let (x, w, dy) = (randn(rows * d, 4, 3.0), randn(d, 5, 0.5), randn(rows * d, 10, 1.0));
        let (xb, wb, dyb) = (
            up_f32(dev, &x).unwrap(),
            up_f32(dev, &w).unwrap(),
            up_f32(dev, &dy).unwrap(),
        );
        for style in [NormStyle::Standard, NormStyle::ZeroCentered] {
            let zc = style == NormStyle::ZeroCentered;
            let (mut y, mut rstd) = (vec![0.0; rows * d], vec![0.0; rows]);
            rmsnorm::rmsnorm_fwd(&x, &w, style, 1e-6, &mut y, &mut rstd);
            let (yb, rb) = (zeros_f32(dev, rows * d).unwrap(), zeros_f32(dev, rows).unwrap());
            ops::rmsnorm_fwd(dev, &xb, &wb, &yb, &rb, rows, d, 1e-6, zc).unwrap();
            close("rmsnorm_fwd y", &down_f32(dev, &yb).unwrap(), &y, 1e-5);
            close("rmsnorm_fwd rstd", &down_f32(dev, &rb).unwrap(), &rstd, 1e-5);
            let (mut dx, mut dw) = (vec![0.0; rows * d], vec![0.0; d]);
            rmsnorm::rmsnorm_bwd(&x, &w, style, &rstd, &dy, &mut dx, false, &mut dw);
            let (dxb, dwb) = (zeros_f32(dev, rows * d).unwrap(), zeros_f32(dev, d).unwrap());
            ops::rmsnorm_bwd(dev, &xb, &wb, &rb, &dyb, &dxb, &dwb, rows, d, zc, false).unwrap();
            close("rmsnorm_bwd dx", &down_f32(dev, &dxb).unwrap(), &dx, 1e-5);
            close("rmsnorm_bwd dw", &down_f32(dev, &dwb).unwrap(), &dw, 1e-5);
        }

        // cross-entropy with an ignored row, and −inf logits in row 2 (among them the first
        // element of threads 0 and 1: the online max/sum must not turn them into NaN)
        let (r, vocab) = (9, 5000);
        let mut logits = randn(r * vocab, 9, 3.0);
        for j in [0, 1, 7, 4999] {
            logits[2 * vocab + j] = f32::NEG_INFINITY;
        }
        let mut targets: Vec<u32> = (0..r as u32).map(|i| i * 541 % vocab as u32).collect();
        targets[4] = ce::IGNORE;
        // each row's loss on the host (the CPU op's mean over a one-row batch)
        let row_loss: Vec<f64> = (0..r)
            .map(|i| {
                let mut g = logits[i * vocab..(i + 1) * vocab].to_vec();
                ce::cross_entropy(&mut g, vocab, &targets[i..i + 1], true)
            })
            .collect();
        let mut grad = logits.clone();
        let mean = ce::cross_entropy(&mut grad, vocab, &targets, true);
        let t32: Vec<i32> = targets
            .iter()
            .map(|&t| if t == ce::IGNORE { -1 } else { t as i32 })
            .collect();
        let (lb, tb, lossb) = (
            up_f32(dev, &logits).unwrap(),
            up_i32(dev, &t32).unwrap(),
            zeros_f32(dev, r).unwrap(),
        );
        ops::cross_entropy(dev, &lb, &tb, &lossb, r, vocab, 1.0 / 8.0).unwrap();
        let loss = down_f32(dev, &lossb).unwrap();
        assert!(
            (loss.iter().sum::<f32>() as f64 / 8.0 - mean).abs() < 1e-4 * mean.abs().max(1.0),
            "{loss:?} vs {mean}"
        );
        assert_eq!(loss[4], 0.0);
        for (i, (&got, &want)) in loss.iter().zip(&row_loss).enumerate() {
            let want = if i == 4 { 0.0 } else { want }; // per row, unscaled
            assert!(
                (got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                "row {i}: {got} vs {want}"
            );
        }
        close("cross-entropy gradient", &down_f32(dev, &lb).unwrap(), &grad, 1e-5);
        // a NaN logit makes its row's loss NaN, and only its row's
        let mut bad = randn(2 * vocab, 11, 3.0);
        bad[vocab + 3000] = f32::NAN;
        let (bb, lb2) = (up_f32(dev, &bad).unwrap(), zeros_f32(dev, 2).unwrap());
        ops::cross_entropy(dev, &bb, &tb, &lb2, 2, vocab, 1.0).unwrap();
        let l2 = down_f32(dev, &lb2).unwrap();
        assert!(l2[0].is_finite() && l2[1].is_nan(), "losses {l2:?}");
    }
}

/// The multi-tensor AdamW (`adamw_multi` through [`ops::TensorTable`], as the device model runs
/// it) over a few steps against the CPU optimizer, with norm gains and embeddings exempt from
/// weight decay; and the table's squared-gradient sum against the host's. Tensors with a bf16
/// copy get, bit for bit, the round-to-nearest-even of their updated f32 param written into it
/// (and nothing past it); one without (the second, a null pointer in the table) is updated
/// all the same.
#[test]
fn adamw_matches_the_cpu_optimizer() {
    use gated_lm::model::params::{ParamKind, ParamStore};
    use gated_lm::optim::{AdamW, AdamWConfig};
    let cfg = gated_lm::config::ModelConfig::preset("micro", None).unwrap();
    let (specs, _) = gated_lm::model::params::param_specs(&cfg);
    let spec = &specs[..3];
    assert!(spec
        .iter()
        .any(|s| matches!(s.kind, ParamKind::Norm | ParamKind::Embedding)));
    assert!(spec
        .iter()
        .any(|s| !matches!(s.kind, ParamKind::Norm | ParamKind::Embedding)));
    for dev in devices() {
        let dev = dev.as_ref();
        let hp = AdamWConfig {
            no_decay_norms_embeddings: true,
            ..AdamWConfig::default()
        };
        let mut opt: AdamW<f32> = AdamW::new(hp.clone(), spec);
        let mut p: ParamStore<f32> = ParamStore::zeros_like(spec);
        for (i, t) in p.tensors.iter_mut().enumerate() {
            t.data = randn(t.data.len(), 11 + i as u64, 0.02);
        }
        let pb: Vec<_> = p.tensors.iter().map(|t| up_f32(dev, &t.data).unwrap()).collect();
        let mut gb: Vec<_> = p
            .tensors
            .iter()
            .map(|t| zeros_f32(dev, t.data.len()).unwrap())
            .collect();
        let mb: Vec<_> = p
            .tensors
            .iter()
            .map(|t| zeros_f32(dev, t.data.len()).unwrap())
            .collect();
        let vb: Vec<_> = p
            .tensors
            .iter()
            .map(|t| zeros_f32(dev, t.data.len()).unwrap())
            .collect();
        // one sentinel element past each copy
        const PAST: u16 = 0x7e7e;
        let bf: Vec<_> = p
            .tensors
            .iter()
            .map(|t| up_u16(dev, &[vec![0; t.data.len()], vec![PAST]].concat()).unwrap())
            .collect();
        let has_copy = |i: usize| i != 1;
        let entries: Vec<_> = (0..spec.len())
            .map(|i| {
                let exempt = matches!(spec[i].kind, ParamKind::Norm | ParamKind::Embedding);
                (
                    &pb[i],
                    &gb[i],
                    &mb[i],
                    &vb[i],
                    exempt,
                    Some(&bf[i]).filter(|_| has_copy(i)),
                )
            })
            .collect();
        let table = ops::TensorTable::new(dev, &entries).unwrap();
        drop(entries);
        let short = dev.zeros(2 * p.tensors[0].data.len() - 2).unwrap();
        let e = ops::TensorTable::new(dev, &[(&pb[0], &gb[0], &mb[0], &vb[0], false, Some(&short))])
            .err()
            .unwrap();
        assert!(format!("{e}").contains("bf16 copy"), "{e}");
        for step in 1..=3 {
            let mut g: ParamStore<f32> = ParamStore::zeros_like(spec);
            for (i, t) in g.tensors.iter_mut().enumerate() {
                t.data = randn(t.data.len(), 20 + 10 * step as u64 + i as u64, 1e-2);
                let bytes: Vec<u8> = t.data.iter().flat_map(|x| x.to_ne_bytes()).collect();
                dev.write(&mut gb[i], &bytes).unwrap();
            }
            let sumsq: f64 = g
                .tensors
                .iter()
                .flat_map(|t| &t.data)
                .map(|&x| x as f64 * x as f64)
                .sum();
            let got = table.grad_sumsq(dev).unwrap();
            assert!((got - sumsq).abs() <= 1e-4 * sumsq, "grad_sumsq {got} vs {sumsq}");
            opt.update_scaled(&mut p, &g, spec, 1e-3, 0.5);
            let st = ops::AdamStep {
                lr: 1e-3,
                beta1: hp.beta1 as f32,
                beta2: hp.beta2 as f32,
                eps: hp.eps as f32,
                weight_decay: hp.weight_decay as f32,
                bias_correction1: gated_lm::optim::bias_correction(hp.beta1, step) as f32,
                bias_correction2: gated_lm::optim::bias_correction(hp.beta2, step) as f32,
                scale: 0.5,
            };
            table.adamw(dev, &st, 0.0).unwrap();
            for (i, t) in p.tensors.iter().enumerate() {
                let what = format!("adamw_multi step {step} tensor {i} ({:?})", spec[i].kind);
                let got = down_f32(dev, &pb[i]).unwrap();
                close(&what, &got, &t.data, 1e-5);
                let copy = down_u16(dev, &bf[i]).unwrap();
                assert_eq!(copy[got.len()], PAST, "{what}: wrote past the bf16 copy");
                if has_copy(i) {
                    let want: Vec<u16> = got.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
                    assert!(
                        copy[..got.len()] == want[..],
                        "{what}: bf16 copy is not the param's rounding"
                    );
                }
            }
        }
    }
}

/// Wrong argument counts or widths are refused before a kernel runs (on the emulator; a GPU
/// would read garbage), and short buffers before any launch.
#[test]
fn bad_launches_are_errors() {
    let emu = gated_lm::backend::cuda::emu::Emu::open().unwrap();
    let b = zeros_f32(&emu, 8).unwrap();
    let e = emu
        .launch("swiglu_fwd", Launch::linear(1, 32), &[b.arg(), b.arg(), Arg::I64(4)])
        .unwrap_err();
    assert!(format!("{e}").contains("3 arguments for 4 parameters"), "{e}");
    // swiglu_fwd(const float* gu, float* m, long n, int ff): an int where the long goes
    let e = emu
        .launch(
            "swiglu_fwd",
            Launch::linear(1, 32),
            &[b.arg(), b.arg(), Arg::I32(4), Arg::I32(2)],
        )
        .unwrap_err();
    assert!(
        format!("{e}").contains("argument 2 has 4 bytes, the parameter 8"),
        "{e}"
    );
    let e = emu.launch("no_such", Launch::linear(1, 32), &[]).unwrap_err();
    assert!(format!("{e}").contains("no kernel no_such"), "{e}");
    let e = ops::swiglu_fwd(&emu, (&b).into(), (&b).into(), 3, 3).unwrap_err();
    assert!(format!("{e}").contains("buffer of 32 bytes"), "{e}");
}

/// Fused causal attention (GQA, several query blocks and partial tiles) with the G1 gate in
/// its epilogue, forward and backward, against the CPU attention and gate ops.
#[test]
fn attention_with_fused_gate_matches_the_cpu_ops() {
    use gated_lm::backend::cuda::ops::{AttnDims, AttnScratch, FusedGate};
    use gated_lm::config::{GateConfig, ModelConfig};
    use gated_lm::model::ops::{attention as att, gate};
    for dev in devices() {
        let dev = dev.as_ref();
        for (batch, seq, heads, kv_heads, head_dim) in [(2, 70, 4, 2, 16), (1, 20, 2, 1, 64)] {
            for fused in [FusedGate::None, FusedGate::Elementwise, FusedGate::Headwise] {
                let what = format!("attention b{batch} t{seq} h{heads}/{kv_heads} d{head_dim} {fused:?}");
                let d = AttnDims {
                    batch,
                    seq,
                    heads,
                    kv_heads,
                    head_dim,
                };
                let sh = att::AttnShape::new(batch, seq, heads, kv_heads, head_dim);
                let (nq, nk) = (batch * seq * heads * head_dim, batch * seq * kv_heads * head_dim);
                let (q, k, v) = (randn(nq, 30, 1.0), randn(nk, 31, 1.0), randn(nk, 32, 1.0));
                let dy = randn(nq, 33, 1.0);
                let (mut o, mut lse) = (vec![0.0; nq], vec![0.0; batch * heads * seq]);
                att::attention_fwd(sh, &q, &k, &v, &mut o, &mut lse, Default::default());
                let mut y = o.clone();
                let mut dout = dy.clone();
                let spec = match fused {
                    FusedGate::None => None,
                    FusedGate::Elementwise => Some("elementwise"),
                    FusedGate::Headwise => Some("headwise"),
                };
                let mut cfg =
                    ModelConfig::preset("micro", spec.and_then(|s| GateConfig::parse_spec(s).unwrap())).unwrap();
                (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) = (heads, kv_heads, head_dim);
                let z = match (&cfg.gate, cfg.gate_geometry()) {
                    (Some(gc), Some(geo)) => {
                        let z = randn(batch * seq * geo.heads * geo.per_head, 34, 2.0);
                        gate::gate_fwd(gc, &geo, &mut y, &z);
                        let mut dz = vec![0.0; z.len()];
                        gate::gate_bwd(gc, &geo, &o, &z, &mut dout, &mut dz);
                        Some((z, dz))
                    }
                    _ => None,
                };
                let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
                att::attention_bwd(sh, &q, &k, &v, &o, &lse, &dout, &mut dq, &mut dk, &mut dv);

                let up = |x: &[f32]| up_f32(dev, x).unwrap();
                let (qb, kb, vb, dyb) = (up(&q), up(&k), up(&v), up(&dy));
                let zb = z.as_ref().map(|(z, _)| up(z));
                let dzb = z.as_ref().map(|(z, _)| zeros_f32(dev, z.len()).unwrap());
                let (ob, yb, lb) = (up(&vec![0.0; nq]), up(&vec![0.0; nq]), up(&vec![0.0; lse.len()]));
                ops::attention_fwd(dev, &d, fused, &qb, &kb, &vb, zb.as_ref(), &ob, &yb, &lb).unwrap();
                let tol = 2e-5;
                close(&format!("{what}: o"), &down_f32(dev, &ob).unwrap(), &o, tol);
                close(&format!("{what}: y"), &down_f32(dev, &yb).unwrap(), &y, tol);
                close(&format!("{what}: lse"), &down_f32(dev, &lb).unwrap(), &lse, tol);
                let scratch = AttnScratch::new(dev, &d).unwrap();
                let (dqb, dkb, dvb) = (up(&vec![0.0; nq]), up(&vec![0.0; nk]), up(&vec![0.0; nk]));
                ops::attention_bwd(
                    dev,
                    &d,
                    fused,
                    (&qb, &kb, &vb, zb.as_ref()),
                    (&ob, &lb, &dyb),
                    &scratch,
                    (&dqb, &dkb, &dvb, dzb.as_ref()),
                )
                .unwrap();
                close(&format!("{what}: dq"), &down_f32(dev, &dqb).unwrap(), &dq, tol);
                close(&format!("{what}: dk"), &down_f32(dev, &dkb).unwrap(), &dk, tol);
                close(&format!("{what}: dv"), &down_f32(dev, &dvb).unwrap(), &dv, tol);
                if let (Some((_, dz)), Some(dzb)) = (&z, &dzb) {
                    close(&format!("{what}: dz"), &down_f32(dev, dzb).unwrap(), dz, tol);
                }
            }
        }
    }
}

/// `acc + A·B` (m×n, row-major) in f64 from element accessors.
fn reference(
    (m, n, k): (usize, usize, usize),
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
    acc: Option<&[f32]>,
) -> Vec<f32> {
    (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            let s: f64 = (0..k).map(|j| a(r, j) as f64 * b(j, c) as f64).sum();
            (s + acc.map_or(0.0, |v| v[i] as f64)) as f32
        })
        .collect()
}

/// The GEMM in the three layouts of a linear layer (x·Wᵀ, dy·W, dyᵀ·x), with and without
/// accumulation, f32 and bf16 operands, against a plain f64 reference on the same (rounded)
/// inputs; and the f32 → bf16 cast against the `half` crate's rounding (read back as bits).
#[test]
fn gemm_and_casts_match_references() {
    use gated_lm::backend::cuda::ops::{self as o, DType, Operand};
    let (rows, din, dout) = (70, 40, 130); // not multiples of the 64×64×16 tiles
    for dev in devices() {
        let dev = dev.as_ref();
        let x = randn(rows * din, 40, 1.0);
        let w = randn(dout * din, 41, 0.5);
        let dy = randn(rows * dout, 42, 1.0);
        let acc0 = randn(rows.max(dout) * din.max(dout), 43, 1.0);
        // bf16 copies, and the f32 values they stand for
        let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&a| half::bf16::from_f32(a).to_f32()).collect() };
        let bits = |v: &[f32]| -> Vec<u16> { v.iter().map(|&a| half::bf16::from_f32(a).to_bits()).collect() };
        for dtype in [DType::F32, DType::Bf16] {
            let (xr, wr, dyr) = match dtype {
                DType::F32 => (x.clone(), w.clone(), dy.clone()),
                DType::Bf16 => (round(&x), round(&w), round(&dy)),
            };
            let up = |v: &[f32]| match dtype {
                DType::F32 => up_f32(dev, v).unwrap(),
                DType::Bf16 => up_u16(dev, &bits(v)).unwrap(),
            };
            let (xb, wb, dyb) = (up(&x), up(&w), up(&dy));
            let op = |b| Operand { buf: b, dtype };
            // y = x·Wᵀ
            let want = reference((rows, dout, din), |r, k| xr[r * din + k], |k, c| wr[c * din + k], None);
            let y = zeros_f32(dev, rows * dout).unwrap();
            o::linear_fwd(dev, op(&xb), op(&wb), &y, rows, din, dout).unwrap();
            close(&format!("{dtype:?} x·Wᵀ"), &down_f32(dev, &y).unwrap(), &want, 1e-5);
            // y = r + x·Wᵀ: the residual read from its own buffer, which stays as it was, and
            // added in the epilogue (the portable kernel: bit for bit x·Wᵀ then the f32 add)
            let r = randn(rows * dout, 45, 1.0);
            let (rb, yr) = (up_f32(dev, &r).unwrap(), zeros_f32(dev, rows * dout).unwrap());
            o::linear_fwd_residual(dev, op(&xb), op(&wb), &rb, &yr, rows, din, dout).unwrap();
            let got = down_f32(dev, &yr).unwrap();
            let plus: Vec<f32> = want.iter().zip(&r).map(|(a, b)| a + b).collect();
            close(&format!("{dtype:?} r + x·Wᵀ"), &got, &plus, 1e-5);
            assert_eq!(down_f32(dev, &rb).unwrap(), r, "{dtype:?}: the residual was written");
            if dev.describe().contains("emulator") {
                let plain = down_f32(dev, &y).unwrap();
                let then_add = plain.iter().zip(&r).map(|(a, b)| (a + b).to_bits());
                assert!(got.iter().map(|g| g.to_bits()).eq(then_add), "{dtype:?}: r + x·Wᵀ bits");
            }
            let e = o::linear_fwd_residual(dev, op(&xb), op(&wb), &yr, &yr, rows, din, dout).unwrap_err();
            assert!(format!("{e}").contains("overlap"), "{e}");
            // dx = acc + dy·W
            let acc = Some(&acc0[..rows * din]);
            let want = reference((rows, din, dout), |r, k| dyr[r * dout + k], |k, c| wr[k * din + c], acc);
            let dx = up_f32(dev, &acc0[..rows * din]).unwrap();
            o::linear_bwd_dx(dev, op(&dyb), op(&wb), &dx, rows, din, dout, true).unwrap();
            close(&format!("{dtype:?} dy·W"), &down_f32(dev, &dx).unwrap(), &want, 1e-5);
            // dW = acc + dyᵀ·x
            let acc = Some(&acc0[..dout * din]);
            let want = reference((dout, din, rows), |r, k| dyr[k * dout + r], |k, c| xr[k * din + c], acc);
            let dw = up_f32(dev, &acc0[..dout * din]).unwrap();
            o::linear_bwd_dw(dev, op(&xb), op(&dyb), &dw, rows, din, dout).unwrap();
            close(&format!("{dtype:?} dyᵀ·x"), &down_f32(dev, &dw).unwrap(), &want, 1e-5);
        }
        // mixed operand types are refused
        let (a, b) = (up_f32(dev, &x).unwrap(), up_u16(dev, &bits(&w)).unwrap());
        let y = zeros_f32(dev, rows * dout).unwrap();
        let e = o::linear_fwd(dev, (&a).into(), Operand::bf16(&b), &y, rows, din, dout).unwrap_err();
        assert!(format!("{e}").contains("mixed types"), "{e}");

        // casts: ties, subnormals, infinities and NaN included
        let mut vals = randn(1000, 44, 3.0);
        vals.extend([
            0.0,
            -0.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            1e-40,
            -3e38,
            f32::INFINITY,
            f32::NAN,
            65504.0,
        ]);
        let n = vals.len();
        let (src, dst) = (up_f32(dev, &vals).unwrap(), dev.zeros(n * 2).unwrap());
        o::cast_to_bf16(dev, &src, &dst, n).unwrap();
        let got = down_u16(dev, &dst).unwrap();
        for (i, (&g, &v)) in got.iter().zip(&vals).enumerate() {
            let want = half::bf16::from_f32(v);
            if v.is_nan() {
                assert!(half::bf16::from_bits(g).is_nan(), "NaN cast to {g:#x}");
            } else {
                assert_eq!(
                    g,
                    want.to_bits(),
                    "element {i}: {v} → {g:#x}, half says {:#x}",
                    want.to_bits()
                );
            }
        }
    }
}

/// Column sums over many rows (more than the 32 chains per column of `colsum_final`) and the
/// embedding backward with repeated ids, against the CPU (both deterministic on the device: no
/// atomics).
#[test]
fn column_sums_and_embedding_match_the_cpu() {
    for dev in devices() {
        let dev = dev.as_ref();
        let (rows, cols) = (700, 37);
        let x = randn(rows * cols, 50, 1.0);
        let acc = randn(cols, 51, 1.0);
        let want: Vec<f32> = (0..cols)
            .map(|c| acc[c] + (0..rows).map(|r| x[r * cols + c] as f64).sum::<f64>() as f32)
            .collect();
        let (xb, out) = (up_f32(dev, &x).unwrap(), up_f32(dev, &acc).unwrap());
        ops::sum_rows(dev, &xb, &out, rows, cols, true).unwrap();
        close("sum_rows", &down_f32(dev, &out).unwrap(), &want, 1e-5);

        let (vocab, d) = (50, 24);
        let ids: Vec<u32> = (0..300u32).map(|i| (i * 7 + i / 13) % 17 + (i % 3) * 11).collect();
        let dout = randn(ids.len() * d, 52, 1.0);
        let table0 = randn(vocab * d, 53, 1.0);
        let mut want = table0.clone();
        gated_lm::model::ops::embedding::embedding_bwd(&mut want, d, &ids, &dout);
        let (db, tb) = (up_f32(dev, &dout).unwrap(), up_f32(dev, &table0).unwrap());
        ops::embed_bwd(dev, &ids, &db, &tb, d).unwrap();
        close("embed_bwd", &down_f32(dev, &tb).unwrap(), &want, 1e-5);

        // the forward gathers rows exactly: d 24 (one column per thread), 300 (two, for some)
        for d in [24, 300] {
            let table = randn(vocab * d, 54, 1.0);
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].to_vec())
                .collect();
            let i32s: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
            let (ib, tb) = (up_i32(dev, &i32s).unwrap(), up_f32(dev, &table).unwrap());
            let out = up_f32(dev, &vec![f32::NAN; ids.len() * d]).unwrap();
            ops::embed_fwd(dev, &ib, &tb, &out, ids.len(), d).unwrap();
            let got = down_f32(dev, &out).unwrap();
            assert!(
                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "embed_fwd d {d}"
            );
        }
    }
}
