//! The training run's full configuration (written resolved to `config.toml` in every run).

use super::schedule::Schedule;
use crate::config::{GateConfig, GateGranularity, ModelConfig, MoeConfig};
use crate::optim::AdamWConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Preset this config started from (informational).
    pub preset: String,
    pub model: ModelConfig,
    pub train: TrainSection,
    pub optim: OptimSection,
    pub schedule: Schedule,
    pub data: DataSection,
    pub stability: StabilitySection,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSection {
    pub seed: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub max_steps: u64,
    /// Stop (cleanly: eval, checkpoint, model, report) after this much wall time; 0 = no limit.
    pub max_seconds: f64,
    pub eval_every: u64,
    /// Validation windows per evaluation = eval_batches × batch_size.
    pub eval_batches: usize,
    pub checkpoint_every: u64,
    /// Threshold ε of the sink rate.
    pub sink_epsilon: f64,
    /// Start from this model directory's weights (continued training, e.g. at a longer context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "OptimToml", into = "OptimToml")]
pub struct OptimSection {
    pub adamw: AdamWConfig,
    /// Global gradient-norm clip; 0 disables.
    pub clip: f64,
}

/// `[optim]` as written: AdamW's fields and `clip` side by side. A plain struct rather than
/// `#[serde(flatten)]`, so a type error names its key (`optim.lr`, not `optim`).
#[derive(Clone, Serialize, Deserialize)]
struct OptimToml {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    #[serde(default)]
    no_decay_norms_embeddings: bool,
    clip: f64,
}

impl From<OptimToml> for OptimSection {
    fn from(o: OptimToml) -> Self {
        OptimSection {
            adamw: AdamWConfig {
                lr: o.lr,
                beta1: o.beta1,
                beta2: o.beta2,
                eps: o.eps,
                weight_decay: o.weight_decay,
                no_decay_norms_embeddings: o.no_decay_norms_embeddings,
            },
            clip: o.clip,
        }
    }
}

impl From<OptimSection> for OptimToml {
    fn from(o: OptimSection) -> Self {
        let a = o.adamw;
        OptimToml {
            lr: a.lr,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            weight_decay: a.weight_decay,
            no_decay_norms_embeddings: a.no_decay_norms_embeddings,
            clip: o.clip,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSection {
    /// Text files / directories / JSONL; empty = the embedded public-domain books.
    pub paths: Vec<String>,
    /// "byte", "bpe" (trained on the corpus) or a path to tokenizer.json / a vocab+merges dir.
    pub tokenizer: String,
    pub bpe_vocab_size: usize,
    pub val_fraction: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StabilitySection {
    /// Losses in the rolling median.
    pub spike_window: usize,
    /// A spike: loss > median × (1 + spike_margin).
    pub spike_margin: f64,
    /// Consecutive non-finite steps that stop the run.
    pub max_bad_steps: u64,
    /// Check every op's output for NaN/Inf and report where it first appears (slower).
    #[serde(default)]
    pub check_finite: bool,
}

/// Training presets' models: RoPE θ 1e4 (short byte-level contexts), head_dim = d / heads.
fn dense(
    layers: usize,
    d: usize,
    heads: usize,
    kv: usize,
    ffn: usize,
    vocab: usize,
    gate: Option<GateConfig>,
) -> ModelConfig {
    ModelConfig {
        rope_theta: 10000.0,
        ..ModelConfig::dense(vocab, d, layers, heads, kv, d / heads, ffn, gate)
    }
}

fn with_moe(mut c: ModelConfig, experts: usize, top_k: usize, ff: usize) -> ModelConfig {
    let mut m = MoeConfig::new(experts, top_k, ff);
    // at this scale transformers' default 0.001 lets the router collapse (400 steps of cpu-moe:
    // imbalance 8.95, lb 2.60); 0.01 balances it (4.15, lb 1.06) at no cost in loss
    m.router_aux_loss_coef = 0.01;
    m.router_z_loss_coef = 1e-3;
    c.moe = Some(m);
    c
}

impl TrainConfig {
    /// Named presets. `cpu-tiny` is the default main job: a G1-elementwise byte-level model whose
    /// loss falls clearly within ~10 minutes on 2 CPU cores. `dense28` / `dense48` mirror the
    /// paper's 1.7B dense shapes (28 and 48 layers; 16/8 heads; FFN 3×d) scaled down 4× in depth
    /// and 16× in width, at the paper-style peak LR and its 2× stress variant (`*-hilr`).
    pub fn preset(name: &str) -> Result<TrainConfig> {
        let g1 = Some(GateConfig::g1(GateGranularity::Elementwise));
        let (model, batch, seq, steps, lr, warmup) = match name {
            "cpu-tiny" => (dense(4, 128, 4, 2, 352, 257, g1), 16, 128, 2000, 3e-3, 100),
            "cpu-micro" => (dense(2, 64, 4, 2, 128, 257, g1), 8, 64, 200, 3e-3, 20),
            "dense28" | "dense28-hilr" => (dense(7, 128, 4, 2, 384, 257, g1), 16, 128, 3000, 4e-3, 150),
            "dense48" | "dense48-hilr" => (dense(12, 128, 4, 2, 384, 257, g1), 16, 128, 3000, 4e-3, 150),
            // cpu-tiny with MoE FFNs at the paper's 15B-A2.5B ratios (top-k = E/16, z-loss):
            // the same active FFN width (2 × 176 = 352) as cpu-tiny
            "cpu-moe" => (with_moe(dense(4, 128, 4, 2, 352, 257, g1), 32, 2, 176), 16, 128, 2000, 3e-3, 100),
            "cpu-moe-micro" => (with_moe(dense(2, 64, 4, 2, 128, 257, g1), 8, 2, 32), 8, 64, 200, 3e-3, 20),
            // a model preset trains with cpu-tiny's schedule at its benchmark shape
            other => match ModelConfig::preset(other, g1) {
                Ok(m) => {
                    let (b, t) = crate::config::preset_shape(other);
                    (m, b, t, 2000, 3e-3, 100)
                }
                Err(_) => bail!(
                    "unknown preset '{other}' (training presets: cpu-tiny, cpu-micro, dense28, dense48, dense28-hilr, dense48-hilr, cpu-moe, cpu-moe-micro; model presets: micro, tiny, small, 1p7b, moe-micro, moe-tiny)"
                ),
            },
        };
        let lr = if name.ends_with("-hilr") { lr * 2.0 } else { lr };
        Ok(TrainConfig {
            preset: name.to_string(),
            model,
            train: TrainSection {
                seed: 0,
                batch_size: batch,
                seq_len: seq,
                grad_accum: 1,
                max_steps: steps,
                max_seconds: 0.0,
                eval_every: (steps / 10).max(1),
                eval_batches: 4,
                checkpoint_every: (steps / 4).max(1),
                sink_epsilon: 0.3,
                init: None,
            },
            optim: OptimSection {
                adamw: AdamWConfig {
                    lr,
                    beta1: 0.9,
                    beta2: 0.95,
                    eps: 1e-8,
                    weight_decay: 0.1,
                    no_decay_norms_embeddings: true,
                },
                clip: 1.0,
            },
            schedule: Schedule {
                warmup_steps: warmup,
                ..Default::default()
            },
            data: DataSection {
                paths: vec![],
                tokenizer: "byte".into(),
                bpe_vocab_size: 4096,
                val_fraction: 0.05,
            },
            stability: StabilitySection {
                spike_window: 50,
                spike_margin: 0.2,
                max_bad_steps: 5,
                check_finite: false,
            },
        })
    }

    /// Overlay a TOML file on this config: only the keys the file names change. Unknown keys
    /// are errors (with the nearest valid key).
    pub fn merge_toml(&self, text: &str, file: &str) -> Result<TrainConfig> {
        let over = parse_checked(text, file)?;
        let mut base = toml::Table::try_from(self).context("cannot serialise config")?;
        merge(&mut base, over);
        from_table(base, file)
    }

    /// A run directory's resolved `config.toml`, read as it is: every section must be there,
    /// nothing is filled in from a preset.
    pub fn from_resolved_toml(text: &str, file: &str) -> Result<TrainConfig> {
        from_table(parse_checked(text, file)?, file)
    }

    /// What a resumed run continues with: this (the run's own config) with the changes `asked`
    /// makes to [`RESUME_SAFE`] keys, and a line for each. Any other difference is an error
    /// naming the keys: a run's recipe cannot change halfway. The vocabulary is the
    /// tokenizer's, not a choice, so it is not compared.
    pub fn resume_with(&self, asked: &TrainConfig, file: &str) -> Result<(TrainConfig, Vec<String>)> {
        let mut asked = asked.clone();
        asked.model.vocab_size = self.model.vocab_size;
        let (run, want) = (flat(self)?, flat(&asked)?);
        let mut keys: Vec<&String> = run.keys().chain(want.keys()).collect();
        keys.sort();
        keys.dedup();
        let show = |v: Option<&String>| v.map_or("(absent)".to_string(), Clone::clone);
        let (mut safe, mut unsafe_) = (vec![], vec![]);
        for k in keys {
            let (a, b) = (run.get(k), want.get(k));
            if a == b {
                continue;
            }
            let line = format!("{k} {} → {}", show(a), show(b));
            if RESUME_SAFE.contains(&k.as_str()) {
                safe.push(line);
            } else {
                unsafe_.push(line);
            }
        }
        if !unsafe_.is_empty() {
            bail!(
                "{file}: a resumed run keeps its config; only {} may change, but these differ from the run's: {}. \
                 Drop those flags to continue the run, or start a new run with another --out",
                RESUME_SAFE.join(", "),
                unsafe_.join("; ")
            );
        }
        let mut cfg = self.clone();
        cfg.train.max_steps = asked.train.max_steps;
        cfg.train.max_seconds = asked.train.max_seconds;
        cfg.train.eval_every = asked.train.eval_every;
        cfg.train.checkpoint_every = asked.train.checkpoint_every;
        cfg.validate().with_context(|| file.to_string())?;
        Ok((cfg, safe))
    }

    /// The `preset = "…"` a config file names, if any.
    pub fn preset_named_in(text: &str, file: &str) -> Result<Option<String>> {
        let t: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{file}: not valid TOML: {e}"))?;
        match t.get("preset") {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => bail!("{file}: `preset` must be a string, got {}", v.type_str()),
        }
    }

    /// Every key a config file may hold: a config with each optional part present.
    fn key_schema() -> toml::Table {
        let mut c = TrainConfig::preset("cpu-moe").expect("built-in preset");
        c.model.rope_scaling = Some(crate::config::RopeScaling {
            attention_factor: Some(1.0),
            ..crate::config::RopeScaling::yarn(2.0, 128)
        });
        c.model.gate = Some(GateConfig {
            init_std: Some(0.02),
            ..GateConfig::g1(GateGranularity::Elementwise)
        });
        if let Some(m) = &mut c.model.moe {
            m.capacity_factor = Some(1.0);
            m.mlp_only_layers = vec![0];
        }
        c.train.init = Some(String::new());
        toml::Table::try_from(&c).expect("config serialises")
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.schedule.validate()?;
        let t = &self.train;
        if t.batch_size == 0 || t.seq_len < 2 || t.grad_accum == 0 {
            bail!("train.batch_size, train.grad_accum must be ≥ 1 and train.seq_len ≥ 2");
        }
        if t.eval_every == 0 || t.checkpoint_every == 0 || t.eval_batches == 0 {
            bail!("train.eval_every, train.checkpoint_every and train.eval_batches must be ≥ 1");
        }
        if t.seq_len > self.model.max_position_embeddings {
            bail!(
                "train.seq_len {} exceeds model.max_position_embeddings {}",
                t.seq_len,
                self.model.max_position_embeddings
            );
        }
        if !(self.optim.adamw.lr > 0.0 && self.optim.adamw.lr.is_finite()) {
            bail!("optim.lr must be a positive number");
        }
        if !(0.0..0.5).contains(&self.data.val_fraction) {
            bail!("data.val_fraction must be in [0, 0.5)");
        }
        Ok(())
    }
}

/// The keys a resumed run may change: how long it runs and how often it evaluates and
/// checkpoints; none of them changes what a step computes.
pub const RESUME_SAFE: &[&str] = &[
    "train.max_steps",
    "train.max_seconds",
    "train.eval_every",
    "train.checkpoint_every",
];

/// Every leaf of a config as `section.key → value` (arrays whole).
fn flat(c: &TrainConfig) -> Result<std::collections::BTreeMap<String, String>> {
    fn walk(t: &toml::Table, path: &str, out: &mut std::collections::BTreeMap<String, String>) {
        for (k, v) in t {
            let full = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            match v {
                toml::Value::Table(sub) => walk(sub, &full, out),
                other => {
                    out.insert(full, other.to_string());
                }
            }
        }
    }
    let mut t = toml::Table::try_from(c).context("cannot serialise config")?;
    // a gate is one choice: compared and shown as its spec
    if let Some(toml::Value::Table(m)) = t.get_mut("model") {
        let spec = c.model.gate.as_ref().map_or("none".into(), GateConfig::spec);
        m.insert("gate".into(), toml::Value::String(spec));
    }
    let mut out = Default::default();
    walk(&t, "", &mut out);
    Ok(out)
}

fn parse_checked(text: &str, file: &str) -> Result<toml::Table> {
    let t: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{file}: not valid TOML: {e}"))?;
    check_keys(&t, &TrainConfig::key_schema(), "", file)?;
    Ok(t)
}

fn from_table(t: toml::Table, file: &str) -> Result<TrainConfig> {
    // toml's error names the full key path (`in `optim.lr``)
    let cfg: TrainConfig = toml::Value::Table(t)
        .try_into()
        .map_err(|e| anyhow::anyhow!("{file}: {}", e.to_string().trim_end().replace('\n', " ")))?;
    cfg.validate().with_context(|| file.to_string())?;
    Ok(cfg)
}

/// Reject keys the schema does not have, naming the key's full path and the nearest valid key.
fn check_keys(t: &toml::Table, schema: &toml::Table, path: &str, file: &str) -> Result<()> {
    for (k, v) in t {
        let full = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        let Some(s) = schema.get(k) else {
            let nearest = schema
                .keys()
                .map(|c| (strsim::damerau_levenshtein(k, c), c))
                .min()
                .filter(|(d, c)| *d <= 2.max(c.len() / 3));
            let hint = match nearest {
                Some((_, c)) if path.is_empty() => format!(" (did you mean `{c}`?)"),
                Some((_, c)) => format!(" (did you mean `{path}.{c}`?)"),
                None => {
                    let mut all: Vec<&str> = schema.keys().map(String::as_str).collect();
                    all.sort();
                    let place = if path.is_empty() {
                        "top level".to_string()
                    } else {
                        format!("[{path}]")
                    };
                    format!(" (valid keys at {place}: {})", all.join(", "))
                }
            };
            bail!("{file}: unknown key `{full}`{hint}");
        };
        // a gate may also be a spec string; only tables are walked
        if let (toml::Value::Table(vt), toml::Value::Table(st)) = (v, s) {
            check_keys(vt, st, &full, file)?;
        }
    }
    Ok(())
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trips_and_partial_files_override_only_their_keys() {
        let c = TrainConfig::preset("cpu-tiny").unwrap();
        let text = c.to_toml().unwrap();
        assert_eq!(c.merge_toml(&text, "x").unwrap(), c);
        let m = c
            .merge_toml("[train]\nseq_len = 64\n[optim]\nlr = 0.001\n", "x")
            .unwrap();
        assert_eq!(m.train.seq_len, 64);
        assert_eq!(m.optim.adamw.lr, 0.001);
        assert_eq!(m.train.batch_size, c.train.batch_size);
        assert!(c.merge_toml("[train]\nseq_len = 1\n", "x").is_err());
        assert!(c
            .merge_toml("[train\n", "bad.toml")
            .unwrap_err()
            .to_string()
            .contains("bad.toml"));
        let hi = TrainConfig::preset("dense48-hilr").unwrap();
        assert_eq!(
            hi.optim.adamw.lr,
            2.0 * TrainConfig::preset("dense48").unwrap().optim.adamw.lr
        );
        assert_eq!(hi.model.num_layers, 12);
    }

    #[test]
    fn the_gate_in_a_config_file_means_what_it_says() {
        let c = TrainConfig::preset("cpu-micro").unwrap();
        // an overlay without a gate keeps the preset's (G1 elementwise); "none" is the baseline
        assert_eq!(
            c.merge_toml("[train]\nseed = 3\n", "x").unwrap().model.gate,
            c.model.gate
        );
        let base = c.merge_toml("[model]\ngate = \"none\"\n", "x").unwrap();
        assert_eq!(base.model.gate, None);
        let hw = c.merge_toml("[model.gate]\ngranularity = \"headwise\"\n", "x").unwrap();
        assert_eq!(hw.model.gate, Some(GateConfig::g1(GateGranularity::Headwise)));
        let g2 = c.merge_toml("[model]\ngate = \"g2:shared\"\n", "x").unwrap();
        assert_eq!(
            g2.model.gate.unwrap().spec(),
            "g2:elementwise:shared:mul:sigmoid:dynamic"
        );
        // a resolved baseline config reads back as a baseline, even overlaid on a gated preset
        let text = base.to_toml().unwrap();
        assert!(text.contains("gate = \"none\""), "{text}");
        assert_eq!(TrainConfig::from_resolved_toml(&text, "x").unwrap(), base);
        assert_eq!(c.merge_toml(&text, "x").unwrap(), base);
        // a resolved config is complete: a missing section is an error, not a preset's value
        let e = TrainConfig::from_resolved_toml("[train]\nseed = 1\n", "run/config.toml").unwrap_err();
        assert!(format!("{e:#}").contains("run/config.toml"), "{e:#}");
    }

    #[test]
    fn resume_accepts_only_safe_changes() {
        let run = TrainConfig::preset("cpu-micro").unwrap();
        let mut asked = run.clone();
        asked.train.max_steps = 500;
        asked.train.eval_every = 7;
        let (cfg, said) = run.resume_with(&asked, "c").unwrap();
        assert_eq!((cfg.train.max_steps, cfg.train.eval_every), (500, 7));
        assert_eq!(said.len(), 2, "{said:?}");
        asked.optim.adamw.lr = 1.0;
        asked.model.gate = None;
        let e = run.resume_with(&asked, "c").unwrap_err().to_string();
        assert!(
            e.contains("optim.lr") && e.contains("model.gate \"g1:elementwise"),
            "{e}"
        );
        assert!(!e.contains("max_steps 200"), "safe keys are not listed as errors: {e}");
        // the vocabulary is the tokenizer's, not a recipe change
        let mut v = run.clone();
        v.model.vocab_size = 999;
        assert!(run.resume_with(&v, "c").is_ok());
    }
}
