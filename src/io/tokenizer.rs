//! Tokenizers: byte-level (ids 0..=255, EOS = 256), BPE trained on the corpus with HF
//! `tokenizers`, or any `tokenizer.json` / GPT-2 `vocab.json` + `merges.txt`.
//! Every run saves a `tokenizer.json` that stock HF tooling loads (the byte tokenizer as a
//! byte-level BPE without merges).

use anyhow::{bail, Context, Result};
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BpeTrainerBuilder, Vocab, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

pub const EOS_TEXT: &str = "<|endoftext|>";

pub enum Tok {
    /// Raw UTF-8 bytes; id 256 is end-of-document.
    Byte,
    Hf {
        tok: Box<Tokenizer>,
        eos: u32,
    },
}

/// GPT-2's reversible byte → printable-char map (the ByteLevel pre-tokenizer's alphabet).
pub fn bytes_to_unicode() -> Vec<char> {
    let mut map = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    map
}

fn byte_level_tokenizer(model: BPE) -> Tokenizer {
    let mut t = Tokenizer::new(model);
    // (add_prefix_space, trim_offsets, use_regex): the GPT-2 split regex, as every byte-level
    // BPE (GPT-2, llama.cpp gpt2 vocabularies) is defined with
    t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    t.with_decoder(Some(ByteLevel::default()));
    t
}

impl Tok {
    pub fn vocab_size(&self) -> usize {
        match self {
            Tok::Byte => 257,
            Tok::Hf { tok, .. } => tok.get_vocab_size(true),
        }
    }

    pub fn eos(&self) -> u32 {
        match self {
            Tok::Byte => 256,
            Tok::Hf { eos, .. } => *eos,
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, special_tokens: bool) -> Result<Vec<u32>> {
        match self {
            Tok::Byte => Ok(text.bytes().map(u32::from).collect()),
            Tok::Hf { tok, .. } => {
                let e = tok
                    .encode(text, special_tokens)
                    .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
                Ok(e.get_ids().to_vec())
            }
        }
    }

    /// `encode` plus the special tokens the model expects around a text (e.g. llama's BOS), for
    /// prompts and analysed texts (training data uses plain `encode` and EOS separators).
    pub fn encode_for_model(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, true)
    }

    /// Prefix every `encode_for_model` with token `bos`.
    pub fn with_bos(self, bos: u32) -> Result<Tok> {
        let Tok::Hf { mut tok, eos } = self else {
            bail!("the byte tokenizer has no BOS token");
        };
        let name = tok
            .id_to_token(bos)
            .with_context(|| format!("bos id {bos} is outside the vocabulary"))?;
        let post = TemplateProcessing::builder()
            .try_single(format!("{name}:0 $A:0"))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .special_tokens(vec![(name, bos)])
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tok.with_post_processor(Some(post));
        Ok(Tok::Hf { tok, eos })
    }

    /// Split `texts` (a vocabulary's user-defined tokens) out of the raw text before
    /// pre-tokenizing, each as its own token, as llama.cpp does with them.
    pub fn with_user_defined(self, texts: Vec<String>) -> Result<Tok> {
        let Tok::Hf { mut tok, eos } = self else {
            bail!("the byte tokenizer has no user-defined tokens");
        };
        let added: Vec<AddedToken> = texts
            .into_iter()
            .filter(|t| !t.is_empty())
            .map(|t| AddedToken::from(t, false).normalized(false))
            .collect();
        tok.add_tokens(&added);
        Ok(Tok::Hf { tok, eos })
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tok::Byte => {
                let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tok::Hf { tok, .. } => tok.decode(ids, false).unwrap_or_default(),
        }
    }

    fn from_hf(tok: Tokenizer, what: &str) -> Result<Tok> {
        let eos = tok
            .token_to_id(EOS_TEXT)
            .or_else(|| tok.token_to_id("</s>"))
            .or_else(|| tok.token_to_id("<eos>"))
            .with_context(|| format!("{what}: no end-of-text token ({EOS_TEXT}, </s> or <eos>)"))?;
        if tok.get_vocab_size(true) == 0 {
            bail!("{what}: empty vocabulary");
        }
        Ok(Tok::Hf {
            tok: Box::new(tok),
            eos,
        })
    }

    /// The byte tokenizer as an HF tokenizer (what `save` writes for it).
    pub fn byte_as_hf() -> Result<Tokenizer> {
        let map = bytes_to_unicode();
        let mut vocab: Vocab = (0..256).map(|b| (map[b].to_string(), b as u32)).collect();
        vocab.insert(EOS_TEXT.into(), 256);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut t = byte_level_tokenizer(bpe);
        t.add_special_tokens(&[AddedToken::from(EOS_TEXT, true)]);
        Ok(t)
    }

    /// Load `tokenizer.json`, or a directory holding it or GPT-2 `vocab.json` + `merges.txt`.
    pub fn load(path: &Path) -> Result<Tok> {
        let what = path.display().to_string();
        if path.is_dir() {
            if path.join("tokenizer.json").exists() {
                return Self::load(&path.join("tokenizer.json"));
            }
            let (v, m) = (path.join("vocab.json"), path.join("merges.txt"));
            if v.exists() && m.exists() {
                let bpe = BPE::from_file(&v.to_string_lossy(), &m.to_string_lossy())
                    .build()
                    .map_err(|e| anyhow::anyhow!("{what}: bad vocab.json/merges.txt: {e}"))?;
                return Self::from_hf(byte_level_tokenizer(bpe), &what);
            }
            bail!("{what}: no tokenizer.json, nor vocab.json + merges.txt");
        }
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {what}"))?;
        Self::from_json(&bytes, &what)
    }

    /// Parse tokenizer.json bytes (`what` names them in errors).
    pub fn from_json(bytes: &[u8], what: &str) -> Result<Tok> {
        // The tokenizers crate panics (`expect`) on some malformed decoder/normalizer sections
        // (found by fuzzing): contain that, silently, and report it as the bad file it is.
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let parsed = std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes));
        std::panic::set_hook(hook);
        let tok = match parsed {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => bail!("{what}: not a valid tokenizer.json: {e}"),
            Err(_) => bail!("{what}: not a valid tokenizer.json (malformed component section)"),
        };
        Self::from_hf(tok, what)
    }

    /// A byte-level BPE from a vocabulary (id = position) and merges ("a b"), e.g. from GGUF.
    pub fn from_vocab_merges(tokens: Vec<String>, merges: Vec<String>, eos: u32) -> Result<Tok> {
        Self::from_vocab_merges_split(tokens, merges, eos, &[], false)
    }

    /// As `from_vocab_merges`, pre-tokenizing with `splits` instead of the GPT-2 regex when there
    /// are any: regexes applied in sequence as llama.cpp does (each splits the pieces the previous
    /// one left; a match and the text between matches alike become pieces), then the byte-level
    /// mapping. `ignore_merges`: a word that is itself in the vocabulary is one token.
    pub fn from_vocab_merges_split(
        tokens: Vec<String>,
        merges: Vec<String>,
        eos: u32,
        splits: &[&str],
        ignore_merges: bool,
    ) -> Result<Tok> {
        if eos as usize >= tokens.len() {
            bail!("eos id {eos} is outside the vocabulary ({})", tokens.len());
        }
        let vocab: Vocab = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .with_context(|| format!("bad merge '{m}'"))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| anyhow::anyhow!("bad BPE vocabulary: {e}"))?;
        let mut tok = byte_level_tokenizer(bpe);
        if !splits.is_empty() {
            let mut seq = splits
                .iter()
                .map(|pattern| {
                    Split::new(
                        SplitPattern::Regex(pattern.to_string()),
                        SplitDelimiterBehavior::Isolated,
                        false,
                    )
                    .map(Into::into)
                    .map_err(|e| anyhow::anyhow!("bad pre-tokenizer regex '{pattern}': {e}"))
                })
                .collect::<Result<Vec<_>>>()?;
            seq.push(ByteLevel::new(false, true, false).into());
            tok.with_pre_tokenizer(Some(Sequence::new(seq)));
        }
        Ok(Tok::Hf {
            tok: Box::new(tok),
            eos,
        })
    }

    /// A SentencePiece BPE vocabulary (llama.cpp's `llama` tokenizer model: pieces, scores,
    /// token types), as transformers' Llama converter builds it: merges derived from the
    /// vocabulary (every split of a normal piece into two pieces, ranked by the piece's score),
    /// "▁" for spaces and a dummy prefix (unless `space_prefix` is false: llama.cpp's
    /// `tokenizer.ggml.add_space_prefix`, false in Gemma files), byte fallback `<0xXX>` for
    /// anything else.
    pub fn from_sentencepiece(
        tokens: Vec<String>,
        scores: &[f32],
        types: &[i32],
        unk: u32,
        eos: u32,
        space_prefix: bool,
    ) -> Result<Tok> {
        const NORMAL: i32 = 1;
        let n = tokens.len();
        if scores.len() != n || types.len() != n {
            bail!("{n} pieces but {} scores and {} token types", scores.len(), types.len());
        }
        if unk as usize >= n || eos as usize >= n {
            bail!("unk id {unk} / eos id {eos} outside the vocabulary ({n})");
        }
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let mut merges: Vec<(f32, u32, u32, String, String)> = Vec::new();
        for (piece, (&score, &ty)) in tokens.iter().zip(scores.iter().zip(types)) {
            if ty != NORMAL {
                continue;
            }
            for (cut, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(cut);
                if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                    merges.push((score, a, b, l.to_string(), r.to_string()));
                }
            }
        }
        // best score first; a piece's own splits by the ids of their parts (transformers' order)
        merges.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges.into_iter().map(|m| (m.3, m.4)).collect())
            .unk_token(tokens[unk as usize].clone())
            .fuse_unk(true)
            .byte_fallback(true)
            .build()
            .map_err(|e| anyhow::anyhow!("bad SentencePiece vocabulary: {e}"))?;
        let mut t = Tokenizer::new(bpe);
        let replace = |a: &str, b: &str| Replace::new(a, b).map_err(|e| anyhow::anyhow!("{e}"));
        let mut norm = vec![replace(" ", "▁")?.into()];
        let mut dec = vec![
            replace("▁", " ")?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if space_prefix {
            norm.insert(0, Prepend::new("▁".into()).into());
            dec.push(Strip::new(' ', 1, 0).into());
        }
        t.with_normalizer(Some(NormSequence::new(norm)));
        t.with_decoder(Some(DecoderSequence::new(dec)));
        Ok(Tok::Hf { tok: Box::new(t), eos })
    }

    /// Train a byte-level BPE with `vocab_size` entries on `texts`.
    pub fn train_bpe(texts: &[String], vocab_size: usize) -> Result<Tok> {
        if vocab_size < 258 {
            bail!("BPE vocab_size must be at least 258 (256 bytes + EOS + one merge), got {vocab_size}");
        }
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(EOS_TEXT, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = TrainerWrapper::BpeTrainer(trainer);
        let mut tok = byte_level_tokenizer(BPE::default());
        tok.train(&mut trainer, texts.iter())
            .map_err(|e| anyhow::anyhow!("BPE training failed: {e}"))?;
        Self::from_hf(tok, "trained BPE")
    }

    /// Write `tokenizer.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = match self {
            Tok::Byte => Self::byte_as_hf()?.to_string(true),
            Tok::Hf { tok, .. } => tok.to_string(true),
        }
        .map_err(|e| anyhow::anyhow!("cannot serialise tokenizer: {e}"))?;
        crate::io::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "It was the best of times, it was the worst of times — naïve café 日本 \n\t end.";

    #[test]
    fn byte_tokenizer_round_trips_and_matches_its_hf_twin() {
        let t = Tok::Byte;
        let ids = t.encode(TEXT).unwrap();
        assert_eq!(ids.len(), TEXT.len());
        assert_eq!(t.decode(&ids), TEXT);
        let dir = tempfile::tempdir().unwrap();
        t.save(dir.path()).unwrap();
        let hf = Tok::load(&dir.path().join("tokenizer.json")).unwrap();
        assert_eq!(
            hf.encode(TEXT).unwrap(),
            ids,
            "tokenizer.json must encode exactly like the byte tokenizer"
        );
        assert_eq!(hf.eos(), 256);
        assert_eq!(hf.decode(&ids), TEXT);
    }

    #[test]
    fn bpe_trains_compresses_and_round_trips() {
        let texts: Vec<String> = (0..200)
            .map(|i| format!("{TEXT} the cat sat on the mat number {i}"))
            .collect();
        let t = Tok::train_bpe(&texts, 400).unwrap();
        assert!(t.vocab_size() <= 400 && t.vocab_size() > 257);
        let ids = t.encode(&texts[3]).unwrap();
        assert!(
            ids.len() < texts[3].len() / 2,
            "BPE should compress: {} ids for {} bytes",
            ids.len(),
            texts[3].len()
        );
        assert_eq!(t.decode(&ids), texts[3]);
        let dir = tempfile::tempdir().unwrap();
        t.save(dir.path()).unwrap();
        let back = Tok::load(dir.path()).unwrap();
        assert_eq!(back.encode(&texts[7]).unwrap(), t.encode(&texts[7]).unwrap());
        assert_eq!(back.eos(), t.eos());
    }

    #[test]
    fn gpt2_vocab_and_merges_load_and_bad_files_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let map = bytes_to_unicode();
        let mut vocab: serde_json::Map<String, serde_json::Value> =
            (0..256).map(|b| (map[b].to_string(), (b as u64).into())).collect();
        vocab.insert("th".into(), 256.into());
        vocab.insert(EOS_TEXT.into(), 257.into());
        std::fs::write(
            dir.path().join("vocab.json"),
            serde_json::Value::Object(vocab).to_string(),
        )
        .unwrap();
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\nt h\n").unwrap();
        let t = Tok::load(dir.path()).unwrap();
        assert_eq!(t.encode("the").unwrap(), vec![256, b'e' as u32]);
        assert_eq!(t.eos(), 257);
        // a file the fuzzer found to make the tokenizers crate panic: now a clean error
        let fz =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz/tokenizer-decoder-panic.json");
        let e = format!("{:#}", Tok::load(&fz).err().unwrap());
        assert!(
            e.contains("tokenizer-decoder-panic.json") && e.contains("not a valid tokenizer.json"),
            "{e}"
        );
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"model\": 3}").unwrap();
        let e = format!("{:#}", Tok::load(&bad).err().unwrap());
        assert!(
            e.contains("bad.json") && e.contains("not a valid tokenizer.json"),
            "{e}"
        );
    }
}
