//! Embeds sentences with the candle-bert engine, or measures its throughput.
//!
//! ```text
//! cargo run --release -p cohort-engines --example bert_bench -- embed MODEL_DIR SENTENCE...
//!     prints {"sentences": [...], "embeddings": [[...]]} (compare with scripts/bert_reference.py)
//! cargo run --release -p cohort-engines --example bert_bench -- bench MODEL_DIR [SECONDS]
//!     sentences/s with one sentence per call and with batches of 32 (length-grouped or not),
//!     over 5 rounds that alternate the modes (best and median round)
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cohort_config::{EngineKind, ModelConfig};
use cohort_engines::bert::{BertEmbedder, PADDING_SLACK};
use cohort_engines::{Engine, LoadContext, Tensor, TensorData, TensorMap};

fn usage() -> ! {
    eprintln!(
        "usage: bert_bench embed MODEL_DIR SENTENCE... | bert_bench bench MODEL_DIR [SECONDS]"
    );
    std::process::exit(2)
}

fn batch(sentences: &[String]) -> Result<TensorMap, Box<dyn std::error::Error>> {
    let mut m = TensorMap::new();
    m.insert(
        "text".into(),
        Tensor::new(
            vec![sentences.len()],
            TensorData::String(sentences.to_vec()),
        )?,
    );
    Ok(m)
}

/// Sentences of 5 to 24 words, from a fixed pseudo-random sequence.
fn corpus(n: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "server",
        "batches",
        "requests",
        "from",
        "many",
        "clients",
        "and",
        "answers",
        "each",
        "one",
        "with",
        "a",
        "vector",
        "of",
        "numbers",
        "that",
        "captures",
        "meaning",
        "sentences",
        "about",
        "similar",
        "topics",
        "end",
        "up",
        "close",
        "together",
        "while",
        "unrelated",
        "text",
        "lands",
        "far",
        "away",
        "in",
        "embedding",
        "space",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|_| {
            let len = 5 + (next() % 20) as usize;
            let words: Vec<&str> = (0..len)
                .map(|_| WORDS[(next() % WORDS.len() as u64) as usize])
                .collect();
            let mut s = words.join(" ");
            s.push('.');
            s
        })
        .collect()
}

fn rate(
    engine: &mut BertEmbedder,
    sentences: &[String],
    per_call: usize,
    budget: Duration,
) -> Result<(f64, usize), Box<dyn std::error::Error>> {
    let calls: Vec<TensorMap> = sentences
        .chunks(per_call)
        .filter(|c| c.len() == per_call)
        .map(batch)
        .collect::<Result<_, _>>()?;
    // Warm up.
    for c in calls.iter().take(1) {
        engine.infer(c)?;
    }
    let start = Instant::now();
    let mut done = 0;
    'outer: loop {
        for c in &calls {
            engine.infer(c)?;
            done += per_call;
            if start.elapsed() >= budget {
                break 'outer;
            }
        }
    }
    Ok((done as f64 / start.elapsed().as_secs_f64(), done))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(cmd), Some(dir)) = (args.first(), args.get(1)) else {
        usage()
    };
    let dir = PathBuf::from(dir);
    let mut model = ModelConfig::new("bench", EngineKind::CandleBert);
    model.path = Some(dir.clone());
    let load_start = Instant::now();
    let mut engine = BertEmbedder::load(&dir, &model, &LoadContext::cpu(&dir))?;
    let load_time = load_start.elapsed();
    match cmd.as_str() {
        "embed" => {
            let sentences = args[2..].to_vec();
            let out = engine.infer(&batch(&sentences)?)?;
            let TensorData::F32(v) = &out["embedding"].data else {
                return Err("embedding is not f32".into());
            };
            let rows: Vec<&[f32]> = v.chunks(engine.hidden_size()).collect();
            println!(
                "{}",
                serde_json::json!({"sentences": sentences, "embeddings": rows})
            );
        }
        "bench" => {
            let seconds: f64 = match args.get(2) {
                Some(s) => s.parse()?,
                None => 10.0,
            };
            let budget = Duration::from_secs_f64(seconds);
            let sentences = corpus(512);
            let count = engine.token_counter().ok_or("no token counter")?;
            let tokens: usize = sentences
                .iter()
                .map(|s| batch(std::slice::from_ref(s)).map(|b| count(&b)))
                .sum::<Result<usize, _>>()?;
            println!(
                "model {} loaded in {:.2?}; {} sentences, {:.1} tokens each on average; {} threads",
                dir.display(),
                load_time,
                sentences.len(),
                tokens as f64 / sentences.len() as f64,
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            );
            let modes = [
                (1, None, "1 per call"),
                (
                    32,
                    Some(PADDING_SLACK),
                    "32 per call, length-grouped (CPU default)",
                ),
                (32, None, "32 per call, one pass padded to the longest"),
            ];
            // Rounds that alternate the modes; the best round of each is the least disturbed
            // by other work on the machine.
            let rounds = 5;
            let mut rates = vec![Vec::new(); modes.len()];
            for _ in 0..rounds {
                for (k, &(per_call, slack, _)) in modes.iter().enumerate() {
                    engine.set_length_grouping(slack);
                    rates[k].push(rate(&mut engine, &sentences, per_call, budget / rounds)?.0);
                }
            }
            for ((per_call, _, what), mut r) in modes.into_iter().zip(rates) {
                r.sort_by(f64::total_cmp);
                let (best, median) = (r[r.len() - 1], r[r.len() / 2]);
                println!(
                    "{what}: best {best:.1} sentences/s ({:.2} ms per call), median {median:.1}",
                    1000.0 * per_call as f64 / best
                );
            }
        }
        _ => usage(),
    }
    Ok(())
}
