//! llama.cpp's BPE pre-tokenizers: which `tokenizer.ggml.pre` names llama.cpp knows, and the
//! list of regexes each applies in sequence (each splits the pieces the previous one left,
//! matches and the text between them alike) before the GPT-2 byte mapping and the merges.
//!
//! The regex strings are llama.cpp's own, as `src/llama-vocab.cpp` (`llm_tokenizer_bpe`) holds
//! them (llama.cpp as vendored by the llama-cpp-python 0.3.36 sdist), written with the same
//! escapes. llama.cpp runs them on its own engine: `std::regex` over a "collapsed" text in which
//! every non-ASCII code point stands for its Unicode category, so `\p{Lu}`, `\p{Ll}`, `\p{Lt}`,
//! `\p{Lm}` and `\p{Lo}` all mean "a letter", and `\d` means an ASCII digit. [`for_engine`]
//! rewrites a regex so that the `fancy-regex` engine of HF `tokenizers` reads it that way.

/// A llama.cpp pre-tokenizer type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PreTok {
    /// llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*` name (lower case, without the prefix).
    pub kind: &'static str,
    /// The regexes, applied in order.
    pub regexes: &'static [&'static str],
    /// A word that is itself in the vocabulary is one token, whatever the merges say.
    pub ignore_merges: bool,
    /// Whether prompts start with BOS when the file's `tokenizer.ggml.add_bos_token` is absent.
    pub add_bos: bool,
}

/// GPT-2's regex (llama.cpp's `gpt2`, `mpt`, `olmo`, …).
const GPT2_RE: &str = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)";

/// Llama 3's regex, case-insensitive contractions spelt out (as llama.cpp adapted it).
const LLAMA3_RE: &str = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/// Qwen2's regex: as Llama 3's with single digits.
const QWEN2_RE: &str = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

const DEFAULT: &[&str] = &["[\\p{P}\\$\\+<=>\\^~\\|]+", GPT2_RE, "\\p{N}+", "[0-9][0-9][0-9]"];
const GPT2: &[&str] = &[GPT2_RE];
const LLAMA3: &[&str] = &[LLAMA3_RE];
const QWEN2: &[&str] = &[QWEN2_RE];
const JAIS2: &[&str] = &[
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s{512}(?!\\S)|\\s{256}(?!\\S)|\\s{128}(?!\\S)|\\s{64}(?!\\S)|\\s{32}(?!\\S)|\\s{16}(?!\\S)|\\s{8}(?!\\S)|\\s{4}(?!\\S)|\\s{1,2}(?!\\S)|\\s{1}",
];
const DEEPSEEK_LLM: &[&str] = &[
    "[\r\n]",
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u{1f7d}ᾀ-ᾴᾶ-ᾼ\u{1fbe}ῂ-ῄῆ-ῌῐ-\u{1fd3}ῖ-\u{1fdb}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u{2126}ℨ\u{212a}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
    "\\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    "\\p{N}+",
];
const DEEPSEEK3: &[&str] = &[
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];
const SPARK2_5: &[&str] = &[
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+",
    "\\p{N}",
];
const YOUTU: &[&str] = &[
    "[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];
const DEEPSEEK_CODER: &[&str] = &["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", "[一-龥ࠀ-一가-퟿]+", "\\p{N}"];
const FALCON: &[&str] = &["[\\p{P}\\$\\+<=>\\^~\\|`]+", GPT2_RE, "[0-9][0-9][0-9]"];
const STARCODER: &[&str] = &["\\p{N}", GPT2_RE];
const QWEN35: &[&str] = &[
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];
const PORO: &[&str] = &[" ?[^(\\s|.,!?…。，、।۔،)]+"];
const VIKING: &[&str] = &[" ?[^(\\s|.,!?…。，、।۔،)]+", "\\p{N}"];
const TEKKEN: &[&str] = &[
    "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];
const CHAMELEON: &[&str] = &[
    "<sentinel:[0-9]+>",
    "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    "([\\t\\n]|    |  )",
    "\\p{N}",
    "[\\p{P}!-/:-@\\[-`{-~]",
    GPT2_RE,
];
const GPT4O: &[&str] = &[
    "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];
const GRANITE_EMB_MULTI: &[&str] = &[
    "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))*((?=[\\p{L}\\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))+((?=[\\p{L}\\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];
const SUPERBPE: &[&str] = &["\\p{N}+", "(?=(\\d{3})+(?!\\d))"];
const BAILINGMOE: &[&str] = &[
    "'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
];
const SEED_CODER: &[&str] = &[
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];
const UFAKZEKA: &[&str] =
    &["[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"];
/// (llama.cpp splits lines with hand-written code equivalent to its first regex)
const LAGUNA: &[&str] = &["[^\\n]+|[\\n]+", QWEN2_RE];
const EXAONE_MOE: &[&str] = &[
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?(?:\\p{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
];
const MINICPM5: &[&str] = &[
    "\\p{N}{1,3}",
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
];

/// The `tokenizer.ggml.pre` names llama.cpp maps to a pre-tokenizer we implement (`default` is
/// also what llama.cpp uses when the key is absent).
pub const SUPPORTED: &[&str] = &[
    "default",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "spark2_5",
    "youtu",
    "falcon",
    "mpt",
    "starcoder",
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v2-es",
    "jina-v2-de",
    "a.x-4.0",
    "mellum",
    "modern-bert",
    "jais-2",
    "refact",
    "command-r",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "qwen35",
    "stablelm2",
    "olmo",
    "dbrx",
    "smaug-bpe",
    "poro-chat",
    "chatglm-bpe",
    "glm4",
    "glm5",
    "viking",
    "jais",
    "tekken",
    "smollm",
    "codeshell",
    "bloom",
    "gpt3-finnish",
    "exaone",
    "exaone4",
    "exaone-moe",
    "chameleon",
    "minerva-7b",
    "megrez",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "granite-embed-multi-97m",
    "superbpe",
    "trillion",
    "granite-docling",
    "bailingmoe",
    "bailingmoe2",
    "llada-moe",
    "seed-coder",
    "hunyuan",
    "hunyuan-dense",
    "hy_v4",
    "joyai-llm",
    "ufakzeka",
    "grok-2",
    "laguna",
    "minimax-m2",
    "solar-open",
    "mellum2",
    "minicpm5",
];

/// The pre-tokenizer llama.cpp uses for a byte-level BPE vocabulary whose `tokenizer.ggml.pre`
/// is `pre`; `None` for a name llama.cpp does not know, and for the few it handles otherwise than
/// with byte-level regexes (`gemma4`/`sarvam-moe`/`whitespace`: raw UTF-8; `kimi-k2`, `afmoe`,
/// `tiny_aya`: hand-written splitters; `jina-v1-en`/`roberta-bpe`: a SEP token we do not add).
pub fn lookup(pre: &str) -> Option<PreTok> {
    let t = |kind, regexes| PreTok {
        kind,
        regexes,
        ignore_merges: false,
        add_bos: false,
    };
    let p = match pre {
        "default" => t("default", DEFAULT),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" => PreTok {
            ignore_merges: true,
            add_bos: true,
            ..t("llama3", LLAMA3)
        },
        "deepseek-llm" => t("deepseek_llm", DEEPSEEK_LLM),
        "deepseek-coder" => t("deepseek_coder", DEEPSEEK_CODER),
        "deepseek-v3" => t("deepseek3_llm", DEEPSEEK3),
        "hunyuan-dense" => t("hunyuan_dense", DEEPSEEK3),
        "hy_v4" => t("hy_v4", DEEPSEEK3),
        "joyai-llm" => t("joyai_llm", DEEPSEEK3),
        "spark2_5" => t("spark2_5", SPARK2_5),
        "youtu" => PreTok {
            ignore_merges: true,
            ..t("youtu", YOUTU)
        },
        "falcon" => t("falcon", FALCON),
        "mpt" => t("mpt", GPT2),
        "starcoder" => t("starcoder", STARCODER),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de" | "a.x-4.0" | "mellum"
        | "modern-bert" | "exaone4" => t("gpt2", GPT2),
        "jais-2" => t("jais2", JAIS2),
        "refact" => t("refact", STARCODER),
        "command-r" => t("command_r", STARCODER),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => t("qwen2", QWEN2),
        "qwen35" => t("qwen35", QWEN35),
        "stablelm2" => t("stablelm2", QWEN2),
        "hunyuan" => t("hunyuan", QWEN2),
        "solar-open" => t("solar_open", QWEN2),
        "olmo" => t("olmo", GPT2),
        "jais" => t("jais", GPT2),
        "trillion" => t("trillion", GPT2),
        "granite-docling" => t("granite_docling", GPT2),
        "dbrx" => t("dbrx", LLAMA3),
        "smaug-bpe" => t("smaug", LLAMA3),
        "poro-chat" => t("poro", PORO),
        "bloom" => t("bloom", PORO),
        "gpt3-finnish" => t("gpt3_finnish", PORO),
        "chatglm-bpe" => t("chatglm4", LLAMA3),
        "glm4" | "glm5" => PreTok {
            ignore_merges: true,
            ..t("chatglm4", LLAMA3)
        },
        "viking" => t("viking", VIKING),
        "tekken" => PreTok {
            ignore_merges: true,
            add_bos: true,
            ..t("tekken", TEKKEN)
        },
        "smollm" => t("smollm", STARCODER),
        "codeshell" => t("codeshell", STARCODER),
        "exaone" => t("exaone", STARCODER),
        "minerva-7b" => t("minerva", STARCODER),
        "mellum2" => t("mellum2", STARCODER),
        "exaone-moe" => t("exaone_moe", EXAONE_MOE),
        "chameleon" => PreTok {
            add_bos: true,
            ..t("chameleon", CHAMELEON)
        },
        "gpt-4o" | "llama4" | "kanana2" | "talkie" => t("gpt4o", GPT4O),
        "minimax-m2" => t("minimax_m2", GPT4O),
        "granite-embed-multi-97m" => PreTok {
            ignore_merges: true,
            ..t("granite_emb_multi", GRANITE_EMB_MULTI)
        },
        "superbpe" => t("superbpe", SUPERBPE),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => t("bailingmoe", BAILINGMOE),
        "seed-coder" => t("seed_coder", SEED_CODER),
        "ufakzeka" => t("ufakzeka", UFAKZEKA),
        "grok-2" => t("grok_2", QWEN2),
        "laguna" => t("laguna", LAGUNA),
        "minicpm5" => PreTok {
            ignore_merges: true,
            ..t("minicpm5", MINICPM5)
        },
        _ => return None,
    };
    Some(p)
}

/// `re` as llama.cpp's engine reads it, for `fancy-regex`: letter subcategories (`\p{Lu}`,
/// `\p{Ll}`, `\p{Lt}`, `\p{Lm}`, `\p{Lo}`) become `\p{L}` (llama.cpp collapses them all to
/// "letter"), and `\d` becomes an ASCII digit (`std::regex`'s `\d`).
pub fn for_engine(re: &str) -> String {
    let mut out = String::with_capacity(re.len());
    let mut in_class = false;
    let mut chars = re.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let Some(e) = chars.next() else {
                    out.push(c);
                    break;
                };
                if e == 'd' {
                    out.push_str(if in_class { "0-9" } else { "[0-9]" });
                    continue;
                }
                if e == 'p' && chars.peek() == Some(&'{') {
                    let name: String = chars.by_ref().take_while(|&x| x != '}').collect();
                    let name = if matches!(name.as_str(), "{Lu" | "{Ll" | "{Lt" | "{Lm" | "{Lo") {
                        "{L"
                    } else {
                        &name
                    };
                    out.push_str("\\p");
                    out.push_str(name);
                    out.push('}');
                    continue;
                }
                out.push(c);
                out.push(e);
            }
            '[' if !in_class => {
                in_class = true;
                out.push(c);
                // a `]` or `^]` first in a class is a literal
                if chars.peek() == Some(&'^') {
                    out.push(chars.next().unwrap());
                }
                if chars.peek() == Some(&']') {
                    out.push(chars.next().unwrap());
                }
            }
            ']' if in_class => {
                in_class = false;
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_name_resolves_and_others_do_not() {
        for name in SUPPORTED {
            let p = lookup(name).unwrap_or_else(|| panic!("{name}"));
            assert!(!p.regexes.is_empty());
        }
        for name in [
            "kimi-k2",
            "afmoe",
            "gemma4",
            "whitespace",
            "tiny_aya",
            "roberta-bpe",
            "gpt2",
            "x",
        ] {
            assert!(lookup(name).is_none(), "{name}");
        }
    }

    #[test]
    fn the_engine_rewrite_touches_only_letter_subcategories_and_digits() {
        assert_eq!(
            for_engine("[\\p{Lu}\\p{M}]*\\p{Ll}+\\p{N}"),
            "[\\p{L}\\p{M}]*\\p{L}+\\p{N}"
        );
        assert_eq!(for_engine("(?=(\\d{3})+(?!\\d))"), "(?=([0-9]{3})+(?![0-9]))");
        assert_eq!(for_engine("[\\d\\\\d]"), "[0-9\\\\d]");
        for r in [GPT2_RE, LLAMA3_RE, QWEN2_RE, DEEPSEEK3[2], TEKKEN[0], DEEPSEEK_LLM[1]] {
            assert_eq!(for_engine(r), r);
        }
    }
}
