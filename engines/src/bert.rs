//! Sentence embeddings with a BERT encoder (all-MiniLM-L6-v2 and its kin), run with candle.
//!
//! The model is a directory in the sentence-transformers layout:
//!
//! | file | what it gives |
//! | --- | --- |
//! | `config.json` | the encoder's shape ([`candle_transformers::models::bert::Config`]) |
//! | `model.safetensors` | the weights, with or without a `bert.` prefix on their names |
//! | `tokenizer.json` | a Hugging Face `tokenizers` tokenizer (WordPiece for BERT) |
//! | `1_Pooling/config.json` | optional: `pooling_mode_mean_tokens`, `_cls_token` or `_max_tokens` (default: mean) |
//! | `sentence_bert_config.json` | optional: `max_seq_length`, the default truncation length |
//!
//! The engine takes input `text` (`string`, shape `[-1]`: one sentence per row) and gives
//! output `embedding` (`f32`, shape `[-1, hidden_size]`), one row per sentence, in order.
//!
//! Tokenization: the padding that a `tokenizer.json` may carry is turned off (the one of
//! all-MiniLM-L6-v2 pads every input to 128 tokens) and each batch is padded to its own
//! longest sequence, with an attention mask so that padding changes no result. On the CPU a
//! batch is first sorted by length and cut into groups that each pad little
//! ([`BertEmbedder::set_length_grouping`]); outputs keep the batch's order. Inputs are
//! truncated to `options.max_length`, by default `max_seq_length` of
//! `sentence_bert_config.json` or else the model's `max_position_embeddings`, and never
//! beyond `max_position_embeddings`.
//!
//! Pooling as `1_Pooling/config.json` says (mean over the real tokens by default), then L2
//! normalization unless `options.normalize` is `false`.
//!
//! [`Engine::token_counter`] counts a request's tokens (special tokens included, after
//! truncation) with the same tokenizer, for the batcher's `max_batch_tokens`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType as CDType, Tensor as CTensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use cohort_config::ModelConfig;
use serde::Deserialize;
use tokenizers::{Encoding, PostProcessor, Tokenizer, TruncationParams};

use crate::{
    DType, Engine, EngineError, LoadContext, ModelMetadata, Tensor, TensorData, TensorMap,
    TensorSpec, TokenCounter,
};

/// The input's name.
pub const INPUT: &str = "text";
/// The output's name.
pub const OUTPUT: &str = "embedding";

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean of the real (unmasked) tokens' vectors.
    Mean,
    /// The first token's (`[CLS]`) vector.
    Cls,
    /// The element-wise maximum over the real tokens.
    Max,
}

/// `1_Pooling/config.json` as sentence-transformers writes it.
#[derive(Debug, Default, Deserialize)]
struct PoolingConfig {
    word_embedding_dimension: Option<usize>,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

impl PoolingConfig {
    fn mode(&self) -> Result<Pooling, String> {
        let unsupported = [
            (
                self.pooling_mode_mean_sqrt_len_tokens,
                "pooling_mode_mean_sqrt_len_tokens",
            ),
            (
                self.pooling_mode_weightedmean_tokens,
                "pooling_mode_weightedmean_tokens",
            ),
            (self.pooling_mode_lasttoken, "pooling_mode_lasttoken"),
        ];
        if let Some((_, name)) = unsupported.iter().find(|(on, _)| *on) {
            return Err(format!("{name} is not supported (mean, cls or max only)"));
        }
        let modes: Vec<Pooling> = [
            (self.pooling_mode_mean_tokens, Pooling::Mean),
            (self.pooling_mode_cls_token, Pooling::Cls),
            (self.pooling_mode_max_tokens, Pooling::Max),
        ]
        .into_iter()
        .filter_map(|(on, mode)| on.then_some(mode))
        .collect();
        match modes.as_slice() {
            [] => Ok(Pooling::Mean),
            [one] => Ok(*one),
            _ => Err(format!(
                "several pooling modes are on ({modes:?}); only one is supported"
            )),
        }
    }
}

/// `sentence_bert_config.json`: only the default truncation length is read.
#[derive(Debug, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

/// On the CPU, a batch runs as groups of similar lengths, cut where padding would add more
/// than this fraction of the group's real tokens (see [`BertEmbedder::set_length_grouping`]).
pub const PADDING_SLACK: f64 = 0.25;

/// The BERT sentence-embedding engine.
pub struct BertEmbedder {
    model: BertModel,
    tokenizer: Arc<Tokenizer>,
    pooling: Pooling,
    normalize: bool,
    hidden: usize,
    pad_id: u32,
    max_length: usize,
    meta: ModelMetadata,
    params: u64,
    device: candle_core::Device,
    /// Length grouping's padding slack; `None`: one padded pass per batch.
    slack: Option<f64>,
}

fn load_err(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::Load {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// A file the model directory must hold.
fn required(dir: &Path, name: &str) -> Result<PathBuf, EngineError> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(load_err(
            &path,
            format!(
                "{name} is missing: a sentence-transformers model directory needs config.json, \
                 model.safetensors and tokenizer.json"
            ),
        ))
    }
}

/// Reads and parses a JSON file.
fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|e| load_err(path, e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| load_err(path, e.to_string()))
}

impl BertEmbedder {
    /// Loads the model directory `dir` onto `ctx.device`, with `model.options` (`normalize`,
    /// `max_length`).
    pub fn load(
        dir: &Path,
        model: &ModelConfig,
        ctx: &LoadContext,
    ) -> Result<BertEmbedder, EngineError> {
        if !dir.is_dir() {
            return Err(load_err(
                dir,
                "not a directory (a candle-bert model is a sentence-transformers directory)",
            ));
        }
        let device = ctx.device.candle()?;

        // The encoder's shape.
        let config_path = required(dir, "config.json")?;
        let config: Config = read_json(&config_path)?;
        if config.hidden_size == 0
            || config.hidden_size.checked_rem(config.num_attention_heads) != Some(0)
        {
            return Err(load_err(
                &config_path,
                format!(
                    "hidden_size {} is not a positive multiple of num_attention_heads {}",
                    config.hidden_size, config.num_attention_heads
                ),
            ));
        }
        if config.max_position_embeddings == 0 {
            return Err(load_err(&config_path, "max_position_embeddings is 0"));
        }
        let pad_id = u32::try_from(config.pad_token_id)
            .ok()
            .filter(|&id| (id as usize) < config.vocab_size)
            .ok_or_else(|| {
                load_err(
                    &config_path,
                    format!(
                        "pad_token_id {} is outside the vocabulary of {}",
                        config.pad_token_id, config.vocab_size
                    ),
                )
            })?;

        // Pooling.
        let pooling_path = dir.join("1_Pooling").join("config.json");
        let pooling = if pooling_path.exists() {
            let pc: PoolingConfig = read_json(&pooling_path)?;
            if let Some(dim) = pc.word_embedding_dimension {
                if dim != config.hidden_size {
                    return Err(load_err(
                        &pooling_path,
                        format!(
                            "word_embedding_dimension {dim} differs from the model's hidden_size {}",
                            config.hidden_size
                        ),
                    ));
                }
            }
            pc.mode().map_err(|e| load_err(&pooling_path, e))?
        } else {
            Pooling::Mean
        };

        // Truncation length.
        let sbert_path = dir.join("sentence_bert_config.json");
        let sbert_max = if sbert_path.exists() {
            read_json::<SentenceBertConfig>(&sbert_path)?.max_seq_length
        } else {
            None
        };
        let max_length = model
            .options
            .max_length
            .or(sbert_max)
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);

        // Tokenizer: no padding of its own, truncation at `max_length`.
        let tokenizer_path = required(dir, "tokenizer.json")?;
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| load_err(&tokenizer_path, e.to_string()))?;
        let specials = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_length <= specials {
            return Err(load_err(
                dir,
                format!(
                    "max_length {max_length} leaves no room for text after the {specials} special tokens"
                ),
            ));
        }
        // Every id the tokenizer can give must index the embedding table. The highest id
        // decides, not the count of tokens: ids may skip numbers. (An id past the table is
        // an error on the CPU, and a device-side assert that breaks the whole CUDA context
        // on a GPU.)
        let vocab = tokenizer.get_vocab_size(true);
        let top = tokenizer.get_vocab(true).into_values().max();
        if top.is_some_and(|id| id as usize >= config.vocab_size) {
            return Err(load_err(
                &tokenizer_path,
                format!(
                    "the tokenizer knows {vocab} tokens with ids up to {} but the model's vocab_size is {}",
                    top.unwrap_or(0),
                    config.vocab_size
                ),
            ));
        }
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| load_err(&tokenizer_path, e.to_string()))?;

        // Weights.
        let weights_path = required(dir, "model.safetensors")?;
        let tensors = candle_core::safetensors::load(&weights_path, &device)
            .map_err(|e| load_err(&weights_path, e.to_string()))?;
        let prefix = weight_prefix(&tensors).ok_or_else(|| {
            load_err(
                &weights_path,
                "no embeddings.word_embeddings.weight (nor bert.embeddings.word_embeddings.weight): \
                 not a BERT model",
            )
        })?;
        let params = count_params(&tensors, prefix);
        let vb = VarBuilder::from_tensors(tensors, CDType::F32, &device);
        let vb = if prefix.is_empty() {
            vb
        } else {
            vb.pp(prefix.trim_end_matches('.'))
        };
        let bert =
            BertModel::load(vb, &config).map_err(|e| load_err(&weights_path, e.to_string()))?;

        let hidden = config.hidden_size;
        let meta = ModelMetadata {
            inputs: vec![TensorSpec::new(INPUT, DType::String, &[-1])],
            outputs: vec![TensorSpec::new(OUTPUT, DType::F32, &[-1, hidden as i64])],
        };
        Ok(BertEmbedder {
            model: bert,
            tokenizer: Arc::new(tokenizer),
            pooling,
            normalize: model.options.normalize.unwrap_or(true),
            hidden,
            pad_id,
            max_length,
            meta,
            params,
            // A GPU wants few, large passes; a CPU pays for every padded token.
            slack: device.is_cpu().then_some(PADDING_SLACK),
            device,
        })
    }

    /// The pooling the model's `1_Pooling/config.json` asks for.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Whether embeddings are L2-normalized.
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// Inputs are truncated to this many tokens, special tokens included.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// How a batch is cut into forward passes: `None` runs it as one pass padded to its
    /// longest sentence; `Some(slack)` sorts it by length and cuts it wherever padding would
    /// add more than `slack` times a group's real tokens (default on the CPU:
    /// [`PADDING_SLACK`]; on a GPU: `None`). Results are the same either way; only speed
    /// differs.
    pub fn set_length_grouping(&mut self, slack: Option<f64>) {
        self.slack = slack.map(|s| s.max(0.0));
    }

    /// The embedding's size.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Embeds sentences: one vector of [`BertEmbedder::hidden_size`] per sentence, in order.
    pub fn embed(&self, sentences: &[&str]) -> Result<Vec<Vec<f32>>, EngineError> {
        let flat = self.embed_flat(sentences)?;
        Ok(flat.chunks(self.hidden).map(<[f32]>::to_vec).collect())
    }

    /// Row-major `[sentences, hidden]`.
    fn embed_flat(&self, sentences: &[&str]) -> Result<Vec<f32>, EngineError> {
        if sentences.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch_fast(sentences.to_vec(), true)
            .map_err(|e| EngineError::Inference(format!("tokenization failed: {e}")))?;
        let mut out = vec![0f32; encodings.len() * self.hidden];
        for group in self.groups(&encodings) {
            let encs: Vec<&Encoding> = group.iter().map(|&i| &encodings[i]).collect();
            let rows = self.forward(&encs)?;
            for (&i, row) in group.iter().zip(rows.chunks(self.hidden)) {
                out[i * self.hidden..(i + 1) * self.hidden].copy_from_slice(row);
            }
        }
        Ok(out)
    }

    /// The batch's rows, in groups that each run as one padded forward pass.
    ///
    /// Without length grouping: one group, in order. With it: rows sorted by length and cut
    /// wherever padding would exceed the slack (a fraction of the group's real tokens).
    fn groups(&self, encodings: &[Encoding]) -> Vec<Vec<usize>> {
        let Some(slack) = self.slack else {
            return vec![(0..encodings.len()).collect()];
        };
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].len());
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut current: Vec<usize> = Vec::new();
        let mut real = 0usize;
        for i in order {
            let len = encodings[i].len();
            // Sorted ascending: `len` is the group's longest, so its padded size.
            let padded = (current.len() + 1) * len;
            if !current.is_empty() && padded as f64 > (1.0 + slack) * (real + len) as f64 {
                groups.push(std::mem::take(&mut current));
                real = 0;
            }
            current.push(i);
            real += len;
        }
        if !current.is_empty() {
            groups.push(current);
        }
        groups
    }

    /// One forward pass over `encs`, padded to the longest; pooled (and normalized) rows.
    fn forward(&self, encs: &[&Encoding]) -> Result<Vec<f32>, EngineError> {
        let rows = encs.len();
        let len = encs.iter().map(|e| e.len()).max().unwrap_or(0).max(1);

        // Pad to the group's longest sequence.
        let mut ids = vec![self.pad_id; rows * len];
        let mut type_ids = vec![0u32; rows * len];
        let mut mask = vec![0u32; rows * len];
        for (r, enc) in encs.iter().enumerate() {
            let base = r * len;
            let n = enc.len();
            ids[base..base + n].copy_from_slice(enc.get_ids());
            type_ids[base..base + n].copy_from_slice(enc.get_type_ids());
            // The tokenizer's own mask (all ones without padding) keeps whatever it masks.
            mask[base..base + n].copy_from_slice(enc.get_attention_mask());
        }
        let ids = CTensor::from_vec(ids, (rows, len), &self.device)?;
        let type_ids = CTensor::from_vec(type_ids, (rows, len), &self.device)?;
        let mask = CTensor::from_vec(mask, (rows, len), &self.device)?;

        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?; // [rows, len, hidden]
        let mask_f = mask.to_dtype(CDType::F32)?.unsqueeze(2)?; // [rows, len, 1]
        let pooled = match self.pooling {
            Pooling::Mean => {
                let sum = hidden.broadcast_mul(&mask_f)?.sum(1)?;
                let count = mask_f.sum(1)?.clamp(1e-9f32, f32::MAX)?;
                sum.broadcast_div(&count)?
            }
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Max => {
                // Padding gets -1e9, as sentence-transformers does.
                let penalty = ((mask_f - 1.0)? * 1e9)?;
                hidden.broadcast_add(&penalty)?.max(1)?
            }
        };
        let out = if self.normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12f32, f32::MAX)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        Ok(out.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// `""` or `"bert."`: where the encoder's weights are in the file.
fn weight_prefix(tensors: &HashMap<String, CTensor>) -> Option<&'static str> {
    ["", "bert."]
        .into_iter()
        .find(|p| tensors.contains_key(&format!("{p}embeddings.word_embeddings.weight")))
}

/// The encoder's parameters: floating-point tensors under `embeddings.` and `encoder.`
/// (not the pooler, an MLM head, or integer buffers such as `position_ids`).
fn count_params(tensors: &HashMap<String, CTensor>, prefix: &str) -> u64 {
    tensors
        .iter()
        .filter(|(name, t)| {
            let name = name.strip_prefix(prefix).unwrap_or(name);
            (name.starts_with("embeddings.") || name.starts_with("encoder."))
                && t.dtype().is_float()
        })
        .map(|(_, t)| t.elem_count() as u64)
        .sum()
}

/// The strings of a request's `text` input.
fn texts(inputs: &TensorMap) -> Result<&[String], EngineError> {
    let t = inputs
        .get(INPUT)
        .ok_or_else(|| EngineError::Inference(format!("input {INPUT} is missing")))?;
    let TensorData::String(v) = &t.data else {
        return Err(EngineError::Inference(format!(
            "input {INPUT} must be string, is {}",
            t.dtype()
        )));
    };
    if t.shape.len() != 1 {
        return Err(EngineError::Inference(format!(
            "input {INPUT} must be 1-D (one sentence per row), has shape {:?}",
            t.shape
        )));
    }
    Ok(v)
}

/// Bytes per token above which [`BertEmbedder::token_counter`] counts a text as the
/// longest without tokenizing it. English text takes 4 to 5 bytes a token.
const COUNT_BYTES_PER_TOKEN: usize = 32;

impl Engine for BertEmbedder {
    fn metadata(&self) -> &ModelMetadata {
        &self.meta
    }

    fn infer(&mut self, inputs: &TensorMap) -> Result<TensorMap, EngineError> {
        let strings = texts(inputs)?;
        let sentences: Vec<&str> = strings.iter().map(String::as_str).collect();
        let flat = self.embed_flat(&sentences)?;
        let mut out = TensorMap::new();
        out.insert(
            OUTPUT.into(),
            Tensor::new(vec![sentences.len(), self.hidden], TensorData::F32(flat))?,
        );
        Ok(out)
    }

    fn memory_bytes(&self) -> u64 {
        self.params * 4
    }

    fn token_counter(&self) -> Option<TokenCounter> {
        let tokenizer = Arc::clone(&self.tokenizer);
        let worst = self.max_length;
        Some(Arc::new(move |inputs: &TensorMap| {
            let Ok(strings) = texts(inputs) else {
                return 0;
            };
            strings
                .iter()
                .map(|s| {
                    // `infer` truncates at `worst` tokens, so a text long enough to surely
                    // reach it is not tokenized here: that would cost a tokio worker time
                    // for nothing. (A text of such length with fewer tokens is counted as
                    // `worst`: more than it takes, never less.)
                    if s.len() > worst.saturating_mul(COUNT_BYTES_PER_TOKEN) {
                        return worst;
                    }
                    // A text the tokenizer rejects fails in `infer`; count it as the longest.
                    tokenizer
                        .encode_fast(s.as_str(), true)
                        .map_or(worst, |e| e.len().min(worst))
                })
                .fold(0, usize::saturating_add)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_modes() {
        let pc = |json: &str| serde_json::from_str::<PoolingConfig>(json).unwrap().mode();
        assert_eq!(pc("{}"), Ok(Pooling::Mean));
        assert_eq!(
            pc(r#"{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false}"#),
            Ok(Pooling::Mean)
        );
        assert_eq!(pc(r#"{"pooling_mode_cls_token": true}"#), Ok(Pooling::Cls));
        assert_eq!(pc(r#"{"pooling_mode_max_tokens": true}"#), Ok(Pooling::Max));
        assert!(
            pc(r#"{"pooling_mode_cls_token": true, "pooling_mode_max_tokens": true}"#).is_err()
        );
        assert!(pc(r#"{"pooling_mode_lasttoken": true}"#).is_err());
    }
}
