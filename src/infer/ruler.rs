//! RULER-style synthetic long-context tasks (Hsieh et al. 2024), generated locally from a seed:
//! needle-in-a-haystack (single, multi-key, multi-value), variable tracking, and common-words
//! extraction. A sample is correct when every expected answer appears in the greedy continuation.

use super::{generate, SampleOptions};
use crate::io::tokenizer::Tok;
use crate::model::decode::KvCache;
use crate::model::Model;
use crate::rng::Rng;
use anyhow::{bail, Result};
use serde::Serialize;

pub const TASKS: [&str; 5] = [
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "variable_tracking",
    "common_words",
];

const FILLER: [&str; 5] = [
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
];
const WORDS: [&str; 40] = [
    "apple", "river", "stone", "candle", "forest", "window", "silver", "garden", "thunder", "harbor", "lantern",
    "meadow", "pepper", "castle", "violet", "anchor", "marble", "falcon", "orchid", "copper", "glacier", "saddle",
    "tulip", "beacon", "ember", "quartz", "willow", "cobalt", "raven", "summit", "walnut", "comet", "dune", "fable",
    "harp", "island", "jasper", "kettle", "lotus", "mosaic",
];

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub task: String,
    pub prompt: String,
    pub answers: Vec<String>,
}

fn number(rng: &mut Rng) -> String {
    (1_000_000 + rng.below(9_000_000)).to_string()
}

fn pick<'a>(rng: &mut Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.below(xs.len() as u64) as usize]
}

fn distinct_words(rng: &mut Rng, n: usize) -> Vec<String> {
    let mut all: Vec<&str> = WORDS.to_vec();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i as u64 + 1) as usize);
    }
    all[..n].iter().map(|s| s.to_string()).collect()
}

/// Filler sentences with `inserts` placed at random sentence boundaries, grown until the whole
/// prompt (with `question`) reaches about `target` tokens.
/// With `ordered`, the inserts keep their order (a chain of assignments).
fn haystack(
    tok: &Tok,
    rng: &mut Rng,
    target: usize,
    inserts: &[String],
    question: &str,
    ordered: bool,
) -> Result<String> {
    let fixed: usize = tok.encode(question)?.len()
        + inserts
            .iter()
            .map(|s| tok.encode(s).map(|v| v.len() + 1))
            .sum::<Result<usize>>()?;
    let per = tok.encode(&format!("{} ", FILLER[0]))?.len().max(1);
    let n = target.saturating_sub(fixed) / per;
    let mut sentences: Vec<String> = (0..n).map(|i| FILLER[i % FILLER.len()].to_string()).collect();
    let mut at: Vec<usize> = inserts.iter().map(|_| rng.below(n as u64 + 1) as usize).collect();
    if ordered {
        at.sort_unstable();
    }
    // insert from the back so earlier positions stay valid
    for (s, &p) in inserts.iter().zip(&at).rev() {
        sentences.insert(p, s.clone());
    }
    Ok(format!("{} {question}", sentences.join(" ")))
}

/// One sample of `task` of about `target` tokens.
pub fn make(task: &str, target: usize, tok: &Tok, rng: &mut Rng) -> Result<Sample> {
    let needle = |k: &str, v: &str| format!("One of the special magic numbers for {k} is: {v}.");
    let (prompt, answers) = match task {
        "niah_single" => {
            let (k, v) = (pick(rng, &WORDS).to_string(), number(rng));
            let q = format!(
                "What is the special magic number for {k} mentioned in the text? The special magic number for {k} is"
            );
            (haystack(tok, rng, target, &[needle(&k, &v)], &q, false)?, vec![v])
        }
        "niah_multikey" => {
            let keys = distinct_words(rng, 4);
            let vals: Vec<String> = (0..4).map(|_| number(rng)).collect();
            let ins: Vec<String> = keys.iter().zip(&vals).map(|(k, v)| needle(k, v)).collect();
            let q = format!(
                "What is the special magic number for {} mentioned in the text? The special magic number for {} is",
                keys[0], keys[0]
            );
            (haystack(tok, rng, target, &ins, &q, false)?, vec![vals[0].clone()])
        }
        "niah_multivalue" => {
            let k = pick(rng, &WORDS).to_string();
            let vals: Vec<String> = (0..4).map(|_| number(rng)).collect();
            let ins: Vec<String> = vals.iter().map(|v| needle(&k, v)).collect();
            let q = format!("What are all the special magic numbers for {k} mentioned in the text? The special magic numbers for {k} are");
            (haystack(tok, rng, target, &ins, &q, false)?, vals)
        }
        "variable_tracking" => {
            let v = number(rng);
            let names: Vec<String> = (0..5)
                .map(|_| (0..5).map(|_| (b'A' + rng.below(26) as u8) as char).collect())
                .collect();
            let mut ins = vec![format!("VAR {} = {v}.", names[0])];
            ins.extend(names.windows(2).map(|w| format!("VAR {} = VAR {}.", w[1], w[0])));
            let q = format!("Find all variables that are assigned the value {v} in the text above. Answer: the variables assigned the value {v} are:");
            (haystack(tok, rng, target, &ins, &q, true)?, names)
        }
        "common_words" => {
            let common = distinct_words(rng, 13);
            let (top, rare) = common.split_at(3);
            let q = "What are the 3 most common words in the list above? Answer: the 3 most common words are:";
            let build = |n: usize, rng: &mut Rng| -> Vec<String> {
                // the three common words take 60% of the list, the others share the rest
                let mut list: Vec<String> = (0..n)
                    .map(|i| {
                        if i % 5 < 3 {
                            top[i % 3].clone()
                        } else {
                            rare[rng.below(rare.len() as u64) as usize].clone()
                        }
                    })
                    .collect();
                for i in (1..list.len()).rev() {
                    list.swap(i, rng.below(i as u64 + 1) as usize);
                }
                list
            };
            let render = |l: &[String]| {
                l.iter()
                    .enumerate()
                    .map(|(i, w)| format!("{}. {w}", i + 1))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            // size the list in two passes: measure a first guess, then scale it to the target
            let guess = (target / 4).max(12);
            let measured = tok.encode(&render(&build(guess, &mut rng.clone())))?.len().max(1);
            let budget = target.saturating_sub(tok.encode(q)?.len());
            let list = build((guess * budget / measured).max(12), rng);
            (format!("{} {q}", render(&list)), top.to_vec())
        }
        other => bail!("unknown RULER task '{other}' (known: {})", TASKS.join(", ")),
    };
    Ok(Sample {
        task: task.to_string(),
        prompt,
        answers,
    })
}

/// Correct when every answer appears in the output.
pub fn score(output: &str, answers: &[String]) -> bool {
    answers.iter().all(|a| output.contains(a.as_str()))
}

#[derive(Serialize, Debug)]
pub struct RulerResult {
    pub lengths: Vec<usize>,
    /// task → accuracy per length
    pub accuracy: Vec<(String, Vec<f64>)>,
    pub average: Vec<f64>,
    pub samples: usize,
}

/// The shortest prompt length accepted: below it the needles and the question alone exceed the
/// length, and the task measures nothing.
pub const MIN_LENGTH: usize = 64;

/// Evaluate every task at every length with `samples` samples each (greedy decoding).
pub fn run(
    model: &Model<f32>,
    tok: &Tok,
    lengths: &[usize],
    samples: usize,
    seed: u64,
    tasks: &[&str],
) -> Result<RulerResult> {
    let mut acc = Vec::new();
    for (ti, &task) in tasks.iter().enumerate() {
        let mut row = Vec::new();
        for &len in lengths {
            let mut ok = 0;
            for s in 0..samples {
                let mut rng = Rng::new(seed ^ ((ti as u64) << 40) ^ ((len as u64) << 16) ^ s as u64);
                let smp = make(task, len, tok, &mut rng)?;
                let ids = tok.encode(&smp.prompt)?;
                let max_new = if task.starts_with("niah_single") || task == "niah_multikey" {
                    12
                } else {
                    40
                };
                let mut cache = KvCache::new(model, None, 0)?;
                let out = generate(
                    model,
                    &mut cache,
                    &ids,
                    max_new,
                    &SampleOptions::default(),
                    0,
                    Some(tok.eos()),
                    |_| {},
                )?;
                ok += score(&tok.decode(&out), &smp.answers) as usize;
            }
            row.push(ok as f64 / samples.max(1) as f64);
        }
        acc.push((task.to_string(), row));
    }
    let average = (0..lengths.len())
        .map(|j| acc.iter().map(|(_, r)| r[j]).sum::<f64>() / acc.len().max(1) as f64)
        .collect();
    Ok(RulerResult {
        lengths: lengths.to_vec(),
        accuracy: acc,
        average,
        samples,
    })
}

impl RulerResult {
    pub fn table(&self) -> String {
        let mut s = format!(
            "| task |{}\n|---|{}\n",
            self.lengths.iter().map(|l| format!(" {l} |")).collect::<String>(),
            "---|".repeat(self.lengths.len())
        );
        for (t, r) in &self.accuracy {
            s += &format!(
                "| {t} |{}\n",
                r.iter().map(|a| format!(" {:.1} |", 100.0 * a)).collect::<String>()
            );
        }
        s += &format!(
            "| average |{}\n",
            self.average
                .iter()
                .map(|a| format!(" {:.1} |", 100.0 * a))
                .collect::<String>()
        );
        s
    }
}
