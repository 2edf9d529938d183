//! KV-cache decoding, sampling, perplexity, streaming windows, YaRN and RULER generators.

use gated_lm::config::{GateConfig, ModelConfig, RopeScaling};
use gated_lm::infer::ruler::{make, score, TASKS};
use gated_lm::infer::{perplexity_sliding, perplexity_streaming, sample, SampleOptions};
use gated_lm::io::tokenizer::Tok;
use gated_lm::model::decode::KvCache;
use gated_lm::model::observer::NoObserver;
use gated_lm::model::{shifted_targets, Batch, Model};
use gated_lm::rng::Rng;

fn model(spec: &str, tweak: impl Fn(&mut ModelConfig)) -> Model<f32> {
    let mut c = ModelConfig::preset("micro", GateConfig::parse_spec(spec).unwrap()).unwrap();
    c.init_std = 0.15;
    c.max_position_embeddings = 64;
    tweak(&mut c);
    let mut m = Model::new(c, 5).unwrap();
    // non-trivial norm gains
    let mut r = Rng::new(9);
    for (i, s) in m.specs.clone().iter().enumerate() {
        if s.name.contains("norm") {
            m.params.tensors[i]
                .data
                .iter_mut()
                .for_each(|x| *x += 0.2 * r.normal() as f32);
        }
        // Qwen2's q/k/v biases start at zero
        if s.name.ends_with(".bias") {
            m.params.tensors[i]
                .data
                .iter_mut()
                .for_each(|x| *x = 0.5 * r.normal() as f32);
        }
    }
    m
}

fn ids(n: usize) -> Vec<u32> {
    let mut r = Rng::new(3);
    (0..n).map(|_| r.below(512) as u32).collect()
}

fn full_logits(m: &Model<f32>, ids: &[u32]) -> Vec<f32> {
    let tg = shifted_targets(ids, ids.len());
    m.forward(
        &Batch {
            ids,
            targets: &tg,
            batch: 1,
            seq: ids.len(),
        },
        &mut NoObserver,
    )
    .unwrap()
    .logits
}

#[test]
fn kv_cache_decoding_equals_full_recomputation() {
    type Tweak = Box<dyn Fn(&mut ModelConfig)>;
    let variants: Vec<(&str, Tweak)> = vec![
        ("none", Box::new(|_| {})),
        ("elementwise", Box::new(|_| {})),
        ("headwise", Box::new(|c| c.partial_rotary_factor = 0.5)),
        ("g2:headwise:shared", Box::new(|_| {})),
        ("g3:silu", Box::new(|c| c.qk_norm = false)),
        ("g4:static", Box::new(|_| {})),
        // Qwen2: q/k/v biases, no QK-norm; and biases under a gate at the biased k projection
        (
            "none",
            Box::new(|c| {
                c.qk_norm = false;
                c.attention_bias = true;
            }),
        ),
        ("g3:headwise", Box::new(|c| c.attention_bias = true)),
        (
            "g5:add:ns-sigmoid",
            Box::new(|c| c.rope_scaling = Some(RopeScaling::yarn(4.0, 16))),
        ),
        // dropless MoE routes each token on its own: cached decoding must not change it
        (
            "elementwise",
            Box::new(|c| c.moe = gated_lm::config::MoeConfig::parse_spec("6:2:24:shared=16").unwrap()),
        ),
    ];
    let x = ids(50);
    for (spec, tweak) in variants {
        let m = model(spec, tweak);
        let full = full_logits(&m, &x);
        let mut cache = KvCache::new(&m, None, 0).unwrap();
        let mut got = Vec::new();
        // a prefill chunk, single tokens, then uneven chunks
        for r in [0..13, 13..14, 14..15, 15..31, 31..32, 32..50] {
            got.extend(m.decode(&mut cache, &x[r]).unwrap());
        }
        assert_eq!(cache.len, 50);
        let err = got.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-5, "{spec}: cached decoding differs by {err}");
    }
}

#[test]
fn sliding_window_cache_with_and_without_sinks() {
    let m = model("elementwise", |_| {});
    let x = ids(40);
    let run = |w: Option<usize>, s: usize| {
        let mut c = KvCache::new(&m, w, s).unwrap();
        let mut out = Vec::new();
        for t in &x {
            out.extend(m.decode(&mut c, &[*t]).unwrap());
            assert!(w.is_none_or(|w| c.len <= w));
        }
        (out, c.seen)
    };
    let (full, seen) = run(None, 0);
    assert_eq!(seen, 40);
    assert_eq!(
        run(Some(64), 4).0,
        full,
        "a window larger than the text changes nothing"
    );
    let (w0, _) = run(Some(16), 0);
    let (w4, _) = run(Some(16), 4);
    let vocab = 512;
    // identical until the first eviction, different after
    assert_eq!(&w0[..16 * vocab], &full[..16 * vocab]);
    assert_ne!(w0[20 * vocab..], full[20 * vocab..]);
    assert_ne!(
        w0[20 * vocab..],
        w4[20 * vocab..],
        "keeping sink tokens must change what is attended"
    );
    assert!(KvCache::new(&m, Some(4), 4).is_err());
}

#[test]
fn sampling_semantics() {
    let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln(), -30.0];
    let mut r = Rng::new(1);
    assert_eq!(sample(&logits, &SampleOptions::default(), &mut r), 0);
    let top1 = SampleOptions {
        temperature: 1.0,
        top_k: 1,
        top_p: 1.0,
    };
    assert!((0..50).all(|_| sample(&logits, &top1, &mut r) == 0));
    let nucleus = SampleOptions {
        temperature: 1.0,
        top_k: 0,
        top_p: 0.75,
    };
    assert!(
        (0..200).all(|_| sample(&logits, &nucleus, &mut r) < 2),
        "top-p 0.75 keeps the two most likely"
    );
    let plain = SampleOptions {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    let mut counts = [0usize; 4];
    for _ in 0..20000 {
        counts[sample(&logits, &plain, &mut r) as usize] += 1;
    }
    for (c, p) in counts.iter().zip([0.5, 0.3, 0.2, 0.0]) {
        assert!((*c as f64 / 20000.0 - p).abs() < 0.015, "{counts:?}");
    }
    let (mut a, mut b) = (Rng::new(7), Rng::new(7));
    let s1: Vec<u32> = (0..20).map(|_| sample(&logits, &plain, &mut a)).collect();
    let s2: Vec<u32> = (0..20).map(|_| sample(&logits, &plain, &mut b)).collect();
    assert_eq!(s1, s2);
}

#[test]
fn sliding_perplexity_scores_every_token_once() {
    let m = model("elementwise", |_| {});
    let x = ids(60);
    let tg = shifted_targets(&x, 60);
    let whole = m
        .forward(
            &Batch {
                ids: &x,
                targets: &tg,
                batch: 1,
                seq: 60,
            },
            &mut NoObserver,
        )
        .unwrap()
        .loss;
    let (nll, n) = perplexity_sliding(&m, &x, 64, 32).unwrap();
    assert_eq!(n, 59);
    assert!((nll - whole).abs() < 1e-5);
    let (nll2, n2) = perplexity_sliding(&m, &x, 16, 5).unwrap();
    assert_eq!(n2, 59);
    assert!(
        nll2.is_finite() && (nll2 - whole).abs() > 1e-6,
        "shorter context scores differently"
    );
    let (s, ns) = perplexity_streaming(&m, &x, None, 0).unwrap();
    assert_eq!(ns, 59);
    assert!(
        (s - whole).abs() < 1e-4,
        "streaming without eviction equals the full forward"
    );
}

#[test]
fn ruler_generators_are_deterministic_and_answers_checkable() {
    let tok = Tok::Byte;
    for task in TASKS {
        for len in [512, 2048] {
            let a = make(task, len, &tok, &mut Rng::new(11)).unwrap();
            let b = make(task, len, &tok, &mut Rng::new(11)).unwrap();
            assert_eq!(a, b, "{task}");
            assert_ne!(a, make(task, len, &tok, &mut Rng::new(12)).unwrap());
            let n = tok.encode(&a.prompt).unwrap().len();
            assert!(
                n as f64 > 0.8 * len as f64 && (n as f64) < 1.25 * len as f64,
                "{task}@{len}: {n} tokens"
            );
            // the answers are recoverable from the prompt
            for ans in &a.answers {
                assert!(
                    a.prompt.contains(ans.as_str()),
                    "{task}: answer {ans} not in the prompt"
                );
            }
            assert!(score(&format!(" {} ", a.answers.join(", ")), &a.answers));
            assert!(!score("nothing", &a.answers));
        }
    }
    // variable tracking: the chain appears in order
    let vt = make("variable_tracking", 512, &tok, &mut Rng::new(4)).unwrap();
    let pos: Vec<usize> = vt
        .answers
        .iter()
        .map(|v| vt.prompt.find(&format!("VAR {v} =")).unwrap())
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]));
    // common words: the answers are the three most frequent words of the list
    let cw = make("common_words", 512, &tok, &mut Rng::new(4)).unwrap();
    let list = &cw.prompt[..cw.prompt.find("What are").unwrap()];
    let mut counts: std::collections::HashMap<&str, usize> = Default::default();
    for w in list.split_whitespace().filter(|w| !w.ends_with('.')) {
        *counts.entry(w).or_default() += 1;
    }
    let mut top: Vec<(&str, usize)> = counts.into_iter().collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1));
    let mut want = cw.answers.clone();
    want.sort();
    let mut got: Vec<String> = top[..3].iter().map(|(w, _)| w.to_string()).collect();
    got.sort();
    assert_eq!(got, want);
}

#[test]
fn streaming_on_a_small_trained_pair() {
    use gated_lm::train::config::TrainConfig;
    use gated_lm::train::{run, RunOptions};
    let tmp = tempfile::tempdir().unwrap();
    let text = &gated_lm::train::data::embedded_corpus().unwrap()[0];
    let start = text.char_indices().nth(50_000).unwrap().0;
    let end = text.char_indices().nth(250_000).unwrap().0;
    let corpus = tmp.path().join("c.txt");
    std::fs::write(&corpus, &text[start..end]).unwrap();
    let eval: Vec<u32> = text[end..].bytes().take(300).map(u32::from).collect();
    for gate in ["none", "elementwise"] {
        let mut c = TrainConfig::preset("cpu-micro").unwrap();
        c.model.gate = GateConfig::parse_spec(gate).unwrap();
        c.data.paths = vec![corpus.display().to_string()];
        c.train.max_steps = 60;
        c.train.eval_every = 60;
        c.train.eval_batches = 1;
        let out = tmp.path().join(gate);
        run(c, &out, &RunOptions::default()).unwrap();
        let (m, _) = gated_lm::io::hf::load_model(&out.join("model")).unwrap();
        let (full, _) = perplexity_streaming(&m, &eval, None, 0).unwrap();
        let (w0, _) = perplexity_streaming(&m, &eval, Some(32), 0).unwrap();
        let (w4, _) = perplexity_streaming(&m, &eval, Some(32), 4).unwrap();
        eprintln!("{gate}: loss full {full:.4}, window 32 {w0:.4}, window 32 + 4 sinks {w4:.4}");
        assert!(full < 3.5, "{gate}: the model learned ({full})");
        for v in [w0, w4] {
            assert!(v.is_finite() && v < full + 1.5, "{gate}: windowed loss {v} vs {full}");
        }
        assert_ne!(w0, w4);
    }
}

#[test]
fn yarn_and_base_change_at_load_time_via_the_cli() {
    let bin = env!("CARGO_BIN_EXE_gated-lm");
    let dir = tempfile::tempdir().unwrap();
    let m = model("elementwise", |_| {});
    let mdir = dir.path().join("m");
    gated_lm::io::hf::save_model(&mdir, &m, None).unwrap();
    Tok::Byte.save(&mdir).unwrap();
    let text = dir.path().join("t.txt");
    // varied text: with identical tokens every attention mix is the same and RoPE cannot matter
    let varied: String = (0..40).map(|i| format!("w{} ", i * 7 % 13)).collect();
    std::fs::write(&text, varied).unwrap();
    let ppl = |extra: &[&str]| {
        let o = std::process::Command::new(bin)
            .args(["eval", "--context", "128", "--model"])
            .arg(&mdir)
            .arg("--text")
            .arg(&text)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .split("perplexity ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    let base = ppl(&[]);
    let yarn = ppl(&["--yarn-factor", "4", "--yarn-original", "16"]);
    let theta = ppl(&["--rope-theta", "10000"]); // the micro preset trains at 1e6
    assert!(base.is_finite() && yarn.is_finite() && theta.is_finite());
    assert_ne!(base, yarn);
    assert_ne!(base, theta);
    // a YaRN model round-trips through config.json
    let mut c = m.cfg.clone();
    c.rope_scaling = Some(RopeScaling::yarn(4.0, 16));
    let y = Model::from_params(c, m.params.clone()).unwrap();
    let d2 = dir.path().join("y");
    gated_lm::io::hf::save_model(&d2, &y, None).unwrap();
    assert_eq!(
        gated_lm::io::hf::load_model(&d2).unwrap().0.cfg.rope_scaling,
        y.cfg.rope_scaling
    );
}

#[test]
fn continued_training_at_a_longer_context_with_yarn() {
    let bin = env!("CARGO_BIN_EXE_gated-lm");
    let tmp = tempfile::tempdir().unwrap();
    let text = &gated_lm::train::data::embedded_corpus().unwrap()[0];
    let corpus = tmp.path().join("c.txt");
    std::fs::write(&corpus, &text[..text.char_indices().nth(300_000).unwrap().0]).unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let train = |extra: &[&str], out: &std::path::Path| {
        let o = std::process::Command::new(bin)
            .args([
                "train",
                "--preset",
                "cpu-micro",
                "--quiet",
                "--max-steps",
                "40",
                "--data",
            ])
            .arg(&corpus)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    train(&[], &a);
    train(
        &["--init", a.to_str().unwrap(), "--seq-len", "128", "--yarn-factor", "2"],
        &b,
    );
    let first = |run: &std::path::Path| {
        let t = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(t.lines().next().unwrap()).unwrap();
        v["loss"].as_f64().unwrap()
    };
    assert!(first(&a) > 5.0);
    assert!(
        first(&b) < first(&a) - 1.5,
        "continued training starts from the trained weights: {} vs {}",
        first(&b),
        first(&a)
    );
    let (m, _) = gated_lm::io::hf::load_model(&b.join("model")).unwrap();
    assert_eq!(m.cfg.rope_scaling.as_ref().unwrap().factor, 2.0);
    assert!(std::fs::read_to_string(b.join("config.toml"))
        .unwrap()
        .contains("seq_len = 128"));
}

#[test]
fn streaming_perplexity_rejects_too_short_input() {
    let m = model("none", |_| {});
    assert!(perplexity_streaming(&m, &[5], Some(8), 0).is_err());
    assert!(perplexity_streaming(&m, &[], None, 0).is_err());
}
