//! The candle-bert engine against an independent numpy reference.
//!
//! Fixtures (regenerate with the scripts named in their headers):
//! - `fixtures/tiny_bert/`: a tiny random BERT in the sentence-transformers layout, written by
//!   `scripts/make_tiny_bert.py engines/tests/fixtures/tiny_bert`;
//! - `fixtures/tiny_bert_expected.json` and `fixtures/tiny_bert_expected_maxlen8.json`:
//!   token ids and embeddings computed by `scripts/bert_reference.py` (pure numpy, its own
//!   WordPiece tokenizer), which shares no code with candle or `tokenizers`.
//!
//! The optional test `minilm_golden_values` runs only when `COHORT_MINILM_DIR` names an
//! all-MiniLM-L6-v2 directory (see `scripts/fetch_minilm.sh`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cohort_config::{EngineKind, ModelConfig};
use cohort_engines::bert::{BertEmbedder, Pooling};
use cohort_engines::{
    load_engine, DType, Engine, EngineError, LoadContext, Tensor, TensorData, TensorMap,
};
use serde::Deserialize;

const HIDDEN: usize = 32;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny_dir() -> PathBuf {
    fixtures().join("tiny_bert")
}

#[derive(Deserialize)]
struct Expected {
    max_length: usize,
    sentences: Vec<String>,
    ids: Vec<Vec<u32>>,
    embeddings: Vec<Vec<f32>>,
    #[serde(default)]
    variants: HashMap<String, Vec<Vec<f32>>>,
}

fn expected(name: &str) -> Expected {
    let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn model_config(dir: &Path) -> ModelConfig {
    let mut m = ModelConfig::new("tiny", EngineKind::CandleBert);
    m.path = Some(dir.to_path_buf());
    m
}

fn load_with(dir: &Path, edit: impl FnOnce(&mut ModelConfig)) -> Result<BertEmbedder, EngineError> {
    let mut m = model_config(dir);
    edit(&mut m);
    BertEmbedder::load(dir, &m, &LoadContext::cpu(dir))
}

fn load(dir: &Path) -> BertEmbedder {
    load_with(dir, |_| {}).unwrap()
}

fn text_input(sentences: &[&str]) -> TensorMap {
    let mut m = TensorMap::new();
    m.insert(
        "text".into(),
        Tensor::new(
            vec![sentences.len()],
            TensorData::String(sentences.iter().map(|s| s.to_string()).collect()),
        )
        .unwrap(),
    );
    m
}

/// Runs the engine through the `Engine` trait; one vector per sentence.
fn embed(engine: &mut dyn Engine, sentences: &[&str]) -> Vec<Vec<f32>> {
    let out = engine.infer(&text_input(sentences)).unwrap();
    let t = &out["embedding"];
    let cols = *t.shape.get(1).unwrap();
    assert_eq!(t.shape, vec![sentences.len(), cols]);
    let TensorData::F32(v) = &t.data else {
        panic!("embedding must be f32")
    };
    v.chunks(cols).map(<[f32]>::to_vec).collect()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// Copies the tiny model into a fresh temporary directory, for variations on it.
fn tiny_copy() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let dest = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &dest);
            } else {
                std::fs::copy(entry.path(), dest).unwrap();
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    copy(&tiny_dir(), tmp.path());
    tmp
}

#[test]
fn metadata_and_memory() {
    let dir = tiny_dir();
    let engine = load_engine(&model_config(&dir), &LoadContext::cpu(&dir)).unwrap();
    let meta = engine.metadata();
    assert_eq!(meta.inputs.len(), 1);
    assert_eq!(meta.inputs[0].name, "text");
    assert_eq!(meta.inputs[0].dtype, DType::String);
    assert_eq!(meta.inputs[0].shape, vec![-1]);
    assert_eq!(meta.outputs.len(), 1);
    assert_eq!(meta.outputs[0].name, "embedding");
    assert_eq!(meta.outputs[0].dtype, DType::F32);
    assert_eq!(meta.outputs[0].shape, vec![-1, HIDDEN as i64]);
    assert!(engine.health().is_ok());

    // Encoder parameters only: not the pooler, not the integer position_ids buffer.
    let (vocab, pos, types, layers, inter) = (99, 64, 2, 2, 64);
    let h = HIDDEN;
    let layer = 4 * (h * h + h) + 2 * (2 * h) + (h * inter + inter) + (inter * h + h);
    let params = vocab * h + pos * h + types * h + 2 * h + layers * layer;
    assert_eq!(engine.memory_bytes(), params as u64 * 4);

    let bert = load(&dir);
    assert_eq!(bert.pooling(), Pooling::Mean);
    assert!(bert.normalizes());
    assert_eq!(bert.max_length(), 64);
    assert_eq!(bert.hidden_size(), HIDDEN);
}

#[test]
fn embeddings_match_the_numpy_reference() {
    let exp = expected("tiny_bert_expected.json");
    let sentences: Vec<&str> = exp.sentences.iter().map(String::as_str).collect();
    let mut engine = load(&tiny_dir());

    let batched = embed(&mut engine, &sentences);
    let diff = max_abs_diff(&batched, &exp.embeddings);
    assert!(diff < 1e-4, "batched: max abs diff {diff}");

    // One pass padded to the longest (64 tokens) instead of length groups.
    engine.set_length_grouping(None);
    let padded = embed(&mut engine, &sentences);
    let diff = max_abs_diff(&padded, &exp.embeddings);
    assert!(diff < 1e-4, "one padded pass: max abs diff {diff}");

    let single: Vec<Vec<f32>> = sentences
        .iter()
        .map(|s| embed(&mut engine, &[s]).remove(0))
        .collect();
    let diff = max_abs_diff(&single, &exp.embeddings);
    assert!(diff < 1e-4, "one by one: max abs diff {diff}");
}

#[test]
fn truncation_follows_max_length_option() {
    let exp = expected("tiny_bert_expected_maxlen8.json");
    assert_eq!(exp.max_length, 8);
    let sentences: Vec<&str> = exp.sentences.iter().map(String::as_str).collect();
    let mut engine = load_with(&tiny_dir(), |m| m.options.max_length = Some(8)).unwrap();
    assert_eq!(engine.max_length(), 8);
    let got = embed(&mut engine, &sentences);
    let diff = max_abs_diff(&got, &exp.embeddings);
    assert!(diff < 1e-4, "max abs diff {diff}");
    let count = engine.token_counter().unwrap();
    for (s, ids) in sentences.iter().zip(&exp.ids) {
        assert_eq!(count(&text_input(&[s])), ids.len(), "{s:?}");
    }

    // A max_length beyond the model's positions is cut down to them.
    let engine = load_with(&tiny_dir(), |m| m.options.max_length = Some(10_000)).unwrap();
    assert_eq!(engine.max_length(), 64);
    // One that leaves no room for text is refused.
    assert!(matches!(
        load_with(&tiny_dir(), |m| m.options.max_length = Some(2)),
        Err(EngineError::Load { .. })
    ));
}

#[test]
fn tokenizer_and_token_counter_agree_with_the_reference() {
    let exp = expected("tiny_bert_expected.json");
    // The `tokenizers` crate, with padding off and truncation as the engine sets them.
    let mut tok = tokenizers::Tokenizer::from_file(tiny_dir().join("tokenizer.json")).unwrap();
    tok.with_padding(None);
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: exp.max_length,
        ..Default::default()
    }))
    .unwrap();
    let engine = load(&tiny_dir());
    let count = engine.token_counter().expect("a text engine counts tokens");
    for (s, ids) in exp.sentences.iter().zip(&exp.ids) {
        let enc = tok.encode(s.as_str(), true).unwrap();
        assert_eq!(enc.get_ids(), ids.as_slice(), "{s:?}");
        assert_eq!(count(&text_input(&[s])), ids.len(), "{s:?}");
    }
    // [CLS] and [SEP] count.
    assert_eq!(count(&text_input(&[""])), 2);
    assert_eq!(count(&text_input(&["the"])), 3);
    assert_eq!(count(&text_input(&["the cat", "hello, world!"])), 4 + 6);
    // The tokenizer.json pads to 48; the counter must not see that padding.
    assert_eq!(count(&text_input(&["good"])), 3);
    // Not a text request: nothing to count.
    assert_eq!(count(&TensorMap::new()), 0);
    // Texts longer than max_length tokens count as max_length, as `infer` truncates them;
    // one long enough to surely reach it is not tokenized at all, same answer.
    let max = engine.max_length();
    let long = "the cat ".repeat(max);
    assert_eq!(count(&text_input(&[&long])), max);
    let huge = "the cat ".repeat(max * 100);
    assert_eq!(count(&text_input(&[&huge, "the"])), max + 3);
}

#[test]
fn padding_does_not_change_results() {
    let mut engine = load(&tiny_dir());
    // One forward pass per batch, padded to its longest sentence.
    engine.set_length_grouping(None);
    let sentences = [
        "the",
        "A dog runs fast and the bird sings slowly?",
        "",
        "Hello, world!",
        "WALKING, Reading and Playing. The big dog plays with the small cat.",
        "good",
    ];
    let single: Vec<Vec<f32>> = sentences
        .iter()
        .map(|s| embed(&mut engine, &[s]).remove(0))
        .collect();
    let batched = embed(&mut engine, &sentences);
    let diff = max_abs_diff(&batched, &single);
    assert!(diff < 1e-5, "batch vs one by one: max abs diff {diff}");

    // Order within a batch does not matter either.
    let mut reversed = sentences;
    reversed.reverse();
    let mut back = embed(&mut engine, &reversed);
    back.reverse();
    let diff = max_abs_diff(&back, &single);
    assert!(diff < 1e-5, "reversed batch: max abs diff {diff}");

    // Length groups (the CPU default, and a slack of 0: only equal lengths share a pass)
    // give the same vectors, in the batch's order.
    for slack in [
        Some(cohort_engines::bert::PADDING_SLACK),
        Some(0.0),
        Some(10.0),
    ] {
        engine.set_length_grouping(slack);
        let grouped = embed(&mut engine, &sentences);
        let diff = max_abs_diff(&grouped, &single);
        assert!(diff < 1e-5, "slack {slack:?}: max abs diff {diff}");
    }
}

#[test]
fn embeddings_have_unit_norm() {
    let exp = expected("tiny_bert_expected.json");
    let sentences: Vec<&str> = exp.sentences.iter().map(String::as_str).collect();
    let mut engine = load(&tiny_dir());
    for v in embed(&mut engine, &sentences) {
        assert_eq!(v.len(), HIDDEN);
        assert!((norm(&v) - 1.0).abs() < 1e-5, "norm {}", norm(&v));
    }
}

#[test]
fn normalize_false_gives_the_raw_mean() {
    let exp = expected("tiny_bert_expected.json");
    let sentences: Vec<&str> = exp.sentences.iter().map(String::as_str).collect();
    let mut engine = load_with(&tiny_dir(), |m| m.options.normalize = Some(false)).unwrap();
    assert!(!engine.normalizes());
    let raw = embed(&mut engine, &sentences);
    let diff = max_abs_diff(&raw, &exp.variants["mean_raw"]);
    assert!(diff < 1e-4, "raw: max abs diff {diff}");
    assert!(max_abs_diff(&raw, &exp.embeddings) > 1e-2);
    assert!(raw.iter().any(|v| (norm(v) - 1.0).abs() > 1e-2));

    let mut engine = load_with(&tiny_dir(), |m| m.options.normalize = Some(true)).unwrap();
    let diff = max_abs_diff(&embed(&mut engine, &sentences), &exp.embeddings);
    assert!(diff < 1e-4, "normalize=true: max abs diff {diff}");
}

#[test]
fn pooling_follows_1_pooling_config() {
    let exp = expected("tiny_bert_expected.json");
    let sentences: Vec<&str> = exp.sentences.iter().map(String::as_str).collect();
    let tmp = tiny_copy();
    let pooling_file = tmp.path().join("1_Pooling/config.json");
    for (key, mode, pooling) in [
        ("pooling_mode_cls_token", "cls", Pooling::Cls),
        ("pooling_mode_max_tokens", "max", Pooling::Max),
        ("pooling_mode_mean_tokens", "mean", Pooling::Mean),
    ] {
        std::fs::write(
            &pooling_file,
            format!(r#"{{"word_embedding_dimension": {HIDDEN}, "{key}": true}}"#),
        )
        .unwrap();
        let mut engine = load(tmp.path());
        assert_eq!(engine.pooling(), pooling);
        let got = embed(&mut engine, &sentences);
        let diff = max_abs_diff(&got, &exp.variants[mode]);
        assert!(diff < 1e-4, "{mode}: max abs diff {diff}");
    }

    // No 1_Pooling: mean.
    std::fs::remove_dir_all(tmp.path().join("1_Pooling")).unwrap();
    let mut engine = load(tmp.path());
    assert_eq!(engine.pooling(), Pooling::Mean);
    let diff = max_abs_diff(&embed(&mut engine, &sentences), &exp.embeddings);
    assert!(diff < 1e-4, "default pooling: max abs diff {diff}");

    // Unsupported or inconsistent pooling configurations are load errors naming the file.
    std::fs::create_dir_all(tmp.path().join("1_Pooling")).unwrap();
    for bad in [
        r#"{"pooling_mode_lasttoken": true}"#,
        r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true}"#,
        r#"{"word_embedding_dimension": 7, "pooling_mode_mean_tokens": true}"#,
        "not json",
    ] {
        std::fs::write(&pooling_file, bad).unwrap();
        match load_with(tmp.path(), |_| {}) {
            Err(EngineError::Load { path, .. }) => {
                assert!(path.ends_with("1_Pooling/config.json"), "{path}")
            }
            Err(e) => panic!("{bad}: expected a load error, got {e}"),
            Ok(_) => panic!("{bad}: loaded"),
        }
    }
}

#[test]
fn weights_with_a_bert_prefix_load_the_same() {
    let exp = expected("tiny_bert_expected.json");
    let sentences: Vec<&str> = exp.sentences.iter().map(String::as_str).collect();
    let tmp = tiny_copy();
    let file = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (format!("bert.{name}"), view))
        .collect();
    let out = safetensors::serialize(renamed, None).unwrap();
    drop(st);
    std::fs::write(&file, out).unwrap();

    let mut engine = load(tmp.path());
    let diff = max_abs_diff(&embed(&mut engine, &sentences), &exp.embeddings);
    assert!(diff < 1e-4, "bert. prefix: max abs diff {diff}");
    assert_eq!(
        engine.memory_bytes(),
        load(&tiny_dir()).memory_bytes(),
        "the prefix does not change the parameter count"
    );
}

#[test]
fn missing_files_are_load_errors_naming_the_file() {
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        let tmp = tiny_copy();
        std::fs::remove_file(tmp.path().join(name)).unwrap();
        let err = match load_with(tmp.path(), |_| {}) {
            Err(e) => e,
            Ok(_) => panic!("loaded without {name}"),
        };
        let EngineError::Load { path, .. } = &err else {
            panic!("without {name}: expected a load error, got {err}");
        };
        assert!(path.ends_with(name), "{path}");
        assert!(err.to_string().contains(name), "{err}");
    }

    // Broken files too.
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        let tmp = tiny_copy();
        std::fs::write(tmp.path().join(name), b"garbage").unwrap();
        match load_with(tmp.path(), |_| {}) {
            Err(EngineError::Load { path, .. }) => assert!(path.ends_with(name), "{path}"),
            Err(e) => panic!("broken {name}: expected a load error, got {e}"),
            Ok(_) => panic!("loaded a broken {name}"),
        }
    }

    // No directory at all, through load_engine.
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nowhere");
    let err = load_engine(&model_config(&missing), &LoadContext::cpu(tmp.path()));
    assert!(matches!(err, Err(EngineError::Load { .. })));
    // No path configured.
    let m = ModelConfig::new("tiny", EngineKind::CandleBert);
    assert!(matches!(
        load_engine(&m, &LoadContext::cpu(tmp.path())),
        Err(EngineError::Load { .. })
    ));
}

/// A tokenizer whose ids skip numbers can have fewer tokens than the model's vocab_size and
/// still give an id past the embedding table; that is refused at load, not met per batch
/// (on a GPU it would be a device-side assert that breaks the whole CUDA context).
#[test]
fn a_token_id_past_the_embedding_table_is_a_load_error() {
    let tmp = tiny_copy();
    let path = tmp.path().join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let count = vocab.len();
    let (top_token, _) = vocab
        .iter()
        .max_by_key(|(_, id)| id.as_u64())
        .map(|(t, id)| (t.clone(), id.clone()))
        .unwrap();
    // Same number of tokens; the last one's id moves past the model's 99 embeddings.
    vocab.insert(top_token, serde_json::json!(150));
    assert_eq!(vocab.len(), count);
    std::fs::write(&path, serde_json::to_vec(&tok).unwrap()).unwrap();
    match load_with(tmp.path(), |_| {}) {
        Err(e @ EngineError::Load { .. }) => {
            assert!(e.to_string().contains("ids up to 150"), "{e}");
            assert!(e.to_string().contains("tokenizer.json"), "{e}");
        }
        Err(e) => panic!("expected a load error, got {e}"),
        Ok(_) => panic!("loaded a tokenizer with ids past vocab_size"),
    }
}

#[test]
fn bad_inputs_are_errors_and_empty_batches_are_empty() {
    let mut engine = load(&tiny_dir());
    assert!(engine.infer(&TensorMap::new()).is_err());
    let mut wrong = TensorMap::new();
    wrong.insert(
        "text".into(),
        Tensor::new(vec![1], TensorData::F32(vec![1.0])).unwrap(),
    );
    assert!(matches!(
        engine.infer(&wrong),
        Err(EngineError::Inference(_))
    ));
    let out = engine.infer(&text_input(&[])).unwrap();
    assert_eq!(out["embedding"].shape, vec![0, HIDDEN]);
}

/// all-MiniLM-L6-v2, when `COHORT_MINILM_DIR` names it (`scripts/fetch_minilm.sh DEST`).
#[test]
fn minilm_golden_values() {
    let Some(dir) = std::env::var_os("COHORT_MINILM_DIR") else {
        println!("minilm_golden_values did not run: set COHORT_MINILM_DIR to an all-MiniLM-L6-v2 directory (scripts/fetch_minilm.sh)");
        return;
    };
    let dir = PathBuf::from(dir);
    let mut engine = load(&dir);
    assert_eq!(engine.metadata().outputs[0].shape, vec![-1, 384]);
    let golden = [0.06766f32, 0.06350, 0.04871, 0.07930, 0.03745];
    let v = embed(&mut engine, &["This is an example sentence"]).remove(0);
    println!("all-MiniLM-L6-v2: {:?}", &v[..5]);
    for (i, (got, want)) in v.iter().zip(golden).enumerate() {
        assert!((got - want).abs() < 1e-4, "component {i}: {got} vs {want}");
    }
    assert!((norm(&v) - 1.0).abs() < 1e-5);
    // Batched with a longer sentence, it stays the same.
    let both = embed(
        &mut engine,
        &[
            "This is an example sentence",
            "Each sentence is converted into a vector of 384 numbers, padded per batch.",
        ],
    );
    let diff = max_abs_diff(&both[..1], std::slice::from_ref(&v));
    assert!(diff < 1e-5, "batched: max abs diff {diff}");
    // The tokenizer.json pads to 128; the counter must not.
    let count = engine.token_counter().unwrap();
    assert_eq!(count(&text_input(&["This is an example sentence"])), 7);
}
