//! Continuous batching on a tiny testkit model: batched output equals each sequence alone,
//! sequences joining and leaving mid-flight don't disturb the others, KV is freed, the queue is
//! bounded, and bad requests are refused with the field and the limit.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tandem_engine::{
    Engine, EngineConfig, EngineError, Event, FinishReason, Request, SamplingParams, SpecMode,
    Speculation, StopCriteria,
};
use tandem_model::{LoadOptions, Model};
use tandem_testkit::{tiny_model, TinyConfig, TinyModel};

fn engine(tiny: &TinyModel, cfg: EngineConfig) -> Engine {
    Engine::start(
        Model::load(&tiny.dir, &LoadOptions::default()).unwrap(),
        cfg,
    )
}

fn prompts() -> Vec<Vec<u32>> {
    (0..8u32)
        .map(|i| {
            (0..(3 + 5 * i))
                .map(|j| (i * 31 + j * 7 + 1) % 300)
                .collect()
        })
        .collect()
}

fn greedy(prompt: Vec<u32>, max_new: usize) -> Request {
    Request {
        prompt,
        sampling: SamplingParams::default(),
        stop: StopCriteria {
            max_new_tokens: max_new,
            ..Default::default()
        },
        ignore_eos: false,
        speculation: Speculation::default(),
    }
}

fn tokens(e: &Engine, req: Request) -> Vec<u32> {
    let (toks, _, _) = e.submit(req).unwrap().collect_blocking().unwrap();
    toks.into_iter().map(|t| t.token).collect()
}

/// Each prompt run alone, one at a time.
fn alone(tiny: &TinyModel, max_new: usize) -> Vec<Vec<u32>> {
    let e = engine(tiny, EngineConfig::default());
    prompts()
        .into_iter()
        .map(|p| tokens(&e, greedy(p, max_new)))
        .collect()
}

#[test]
fn eight_batched_equal_each_alone() {
    for cfg in [TinyConfig::llama(), TinyConfig::qwen2()] {
        let tiny = tiny_model(&cfg).unwrap();
        let want = alone(&tiny, 24);
        // A small token budget forces chunked prefill mixed with decodes.
        let e = engine(
            &tiny,
            EngineConfig {
                max_batch_tokens: 16,
                ..Default::default()
            },
        );
        let gens: Vec<_> = prompts()
            .into_iter()
            .map(|p| e.submit(greedy(p, 24)).unwrap())
            .collect();
        let got: Vec<Vec<u32>> = gens
            .into_iter()
            .map(|g| {
                let (t, _, _) = g.collect_blocking().unwrap();
                t.into_iter().map(|t| t.token).collect()
            })
            .collect();
        assert_eq!(got, want, "{:?}", cfg.arch);
        assert!(e.stats().steps.load(std::sync::atomic::Ordering::Relaxed) < 8 * 30);
    }
}

#[test]
fn joining_and_cancelling_mid_flight_leave_others_unchanged() {
    // A long context, so the sequence to cancel can ask for far more tokens than the others.
    let tiny = tiny_model(&TinyConfig {
        max_position_embeddings: 4096,
        ..TinyConfig::llama()
    })
    .unwrap();
    let want = alone(&tiny, 40);
    let e = engine(&tiny, EngineConfig::default());
    let ps = prompts();
    // The one to cancel (index 1) asks for 100x the others' tokens, so it is still running when
    // dropped even if the engine runs far ahead of this thread.
    let mut first: Vec<_> = ps[..4]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let req = if i == 1 {
                Request {
                    ignore_eos: true,
                    ..greedy(p.clone(), 4000)
                }
            } else {
                greedy(p.clone(), 40)
            };
            e.submit(req).unwrap()
        })
        .collect();
    // Wait for a few tokens of the first four, then add two more and cancel one.
    let mut seen: Vec<Vec<u32>> = vec![Vec::new(); 4];
    for (i, g) in first.iter_mut().enumerate() {
        for _ in 0..5 {
            match g.events.blocking_recv().unwrap() {
                Event::Token(t) => seen[i].push(t.token),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let late: Vec<_> = ps[4..6]
        .iter()
        .map(|p| e.submit(greedy(p.clone(), 40)).unwrap())
        .collect();
    let cancelled = first.remove(1);
    drop(cancelled);
    seen.remove(1);
    for (g, mut got) in first.into_iter().zip(seen) {
        let (rest, reason, _) = g.collect_blocking().unwrap();
        got.extend(rest.into_iter().map(|t| t.token));
        assert_eq!(reason, FinishReason::Length);
        assert!(want.contains(&got));
    }
    for (i, g) in late.into_iter().enumerate() {
        let (t, _, _) = g.collect_blocking().unwrap();
        let got: Vec<u32> = t.into_iter().map(|t| t.token).collect();
        assert_eq!(got, want[4 + i]);
    }
    // Every slot is free again once the engine has seen the last step and the cancellation (the
    // bound only catches a hang).
    let stats = e.stats();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if stats.kv_tokens.load(std::sync::atomic::Ordering::Relaxed) == 0
            && stats.cancelled.load(std::sync::atomic::Ordering::Relaxed) >= 1
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        stats.kv_tokens.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(stats.running.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(stats.cancelled.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

#[test]
fn queue_is_bounded_and_bad_requests_are_refused() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    let e = engine(
        &tiny,
        EngineConfig {
            max_running: 1,
            max_waiting: 2,
            max_batch_tokens: 64,
            ..Default::default()
        },
    );
    // Long requests so the queue stays full while we submit.
    let mut held = Vec::new();
    let mut refused = 0;
    for p in prompts() {
        let long = Request {
            ignore_eos: true,
            ..greedy(p, 400)
        };
        match e.submit(long) {
            Ok(g) => held.push(g),
            Err(EngineError::QueueFull { limit }) => {
                assert_eq!(limit, 2);
                refused += 1;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(refused >= 4, "refused {refused}");
    drop(held);
    // Cancellation is processed by the engine thread between steps.
    for _ in 0..500 {
        if e.stats().waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let ctx = e.max_context();
    let cases: Vec<(Request, &str)> = vec![
        (greedy(vec![], 4), "prompt"),
        (greedy(vec![1, 100_000], 4), "prompt"),
        (greedy(vec![1], 0), "max_new_tokens"),
        (greedy(vec![1; ctx], 4), "context"),
        (
            Request {
                sampling: SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                ..greedy(vec![1], 4)
            },
            "temperature",
        ),
        (
            Request {
                sampling: SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                ..greedy(vec![1], 4)
            },
            "top_p",
        ),
        (
            Request {
                stop: StopCriteria {
                    max_new_tokens: 4,
                    stop_strings: vec!["x".into(); 9],
                    ..Default::default()
                },
                ..greedy(vec![1], 4)
            },
            "stop",
        ),
        (
            Request {
                stop: StopCriteria {
                    max_new_tokens: 4,
                    stop_token_ids: vec![1; 65],
                    ..Default::default()
                },
                ..greedy(vec![1], 4)
            },
            "stop_token_ids",
        ),
    ];
    for (req, field) in cases {
        let err = e.submit(req).err().unwrap();
        assert!(err.to_string().contains(field), "{err} should name {field}");
    }
    // And it still serves.
    assert_eq!(tokens(&e, greedy(vec![1, 2, 3], 3)).len(), 3);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let tiny = tiny_model(&TinyConfig::qwen2()).unwrap();
    let e = engine(&tiny, EngineConfig::default());
    let req = |seed| Request {
        sampling: SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ..Default::default()
        },
        ..greedy(vec![5, 6, 7, 8], 32)
    };
    let a = tokens(&e, req(42));
    let b = tokens(&e, req(42));
    let c = tokens(&e, req(43));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn stop_strings_and_eos_end_generation() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    let e = engine(&tiny, EngineConfig::default());
    let text = e.text().clone();
    let prompt = text.encode("the cat and the dog", false).unwrap();
    let (full, _, _) = e
        .submit(greedy(prompt.clone(), 30))
        .unwrap()
        .collect_blocking()
        .unwrap();
    let full_text: String = full.iter().map(|t| t.text.as_str()).collect();
    let all_ids: Vec<u32> = full.iter().map(|t| t.token).collect();
    assert_eq!(full_text, text.decode(&all_ids).unwrap());
    // Stop on a piece of the text greedy produces: output is everything before it.
    let chars: Vec<char> = full_text.chars().collect();
    if chars.len() >= 6 {
        let stop: String = chars[3..5].iter().collect();
        let cut = full_text.find(&stop).unwrap();
        let (got, reason, _) = e
            .submit(Request {
                stop: StopCriteria {
                    max_new_tokens: 30,
                    stop_strings: vec![stop],
                    ..Default::default()
                },
                ..greedy(prompt.clone(), 30)
            })
            .unwrap()
            .collect_blocking()
            .unwrap();
        assert_eq!(reason, FinishReason::StopString);
        let got: String = got.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(got, full_text[..cut]);
    }
    // A stop token id: the first generated token.
    let (got, reason, _) = e
        .submit(Request {
            stop: StopCriteria {
                max_new_tokens: 30,
                stop_token_ids: vec![all_ids[2]],
                ..Default::default()
            },
            ..greedy(prompt, 30)
        })
        .unwrap()
        .collect_blocking()
        .unwrap();
    assert_eq!(reason, FinishReason::StopToken);
    assert!(got.len() <= 3);
}

/// Speculative greedy decoding with the n-gram drafter gives exactly plain greedy's tokens, for
/// every prompt, alone and batched; on repetitive text the verifier accepts drafted tokens.
#[test]
fn speculative_greedy_equals_plain_greedy() {
    for cfg in [TinyConfig::llama(), TinyConfig::qwen2()] {
        let tiny = tiny_model(&cfg).unwrap();
        // Repetitive prompts: greedy output of a tiny model loops, so n-grams recur.
        let ps: Vec<Vec<u32>> = (0..6u32)
            .map(|i| {
                let unit: Vec<u32> = (0..(3 + i)).map(|j| (i * 17 + j * 11 + 2) % 300).collect();
                // The unit four times, once with another last token: n-grams of the unit have
                // two different continuations (alternatives for multi-candidate drafting).
                let mut other = unit.clone();
                if let Some(l) = other.last_mut() {
                    *l = (*l + 1) % 300;
                }
                [&unit[..], &unit, &other, &unit].concat()
            })
            .collect();
        let run = |max_draft: usize, candidates: usize| -> (Vec<Vec<u32>>, Engine) {
            // A fixed draft plan: the adaptive cost model drafts by measured timings, which
            // vary with machine load, and this test asserts that drafting happened.
            let e = engine(
                &tiny,
                EngineConfig {
                    adaptive_draft: false,
                    ..Default::default()
                },
            );
            let gens: Vec<_> = ps
                .iter()
                .map(|p| {
                    e.submit(Request {
                        ignore_eos: true,
                        speculation: Speculation {
                            mode: if max_draft == 0 {
                                SpecMode::Off
                            } else {
                                SpecMode::Ngram
                            },
                            max_draft_tokens: max_draft,
                            candidates,
                        },
                        ..greedy(p.clone(), 48)
                    })
                    .unwrap()
                })
                .collect();
            let out = gens
                .into_iter()
                .map(|g| {
                    let (t, _, _) = g.collect_blocking().unwrap();
                    t.into_iter().map(|t| t.token).collect()
                })
                .collect();
            (out, e)
        };
        let (plain, _) = run(0, 1);
        // Multi-candidate drafting: extra candidates in their own KV slots, same tokens.
        let (multi, m) = run(6, 3);
        assert_eq!(multi, plain, "{:?}: 3 candidates", cfg.arch);
        let wins = m
            .stats()
            .alternative_wins
            .load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("{:?}: an alternative candidate won {wins} times", cfg.arch);
        assert!(wins > 0, "no alternative candidate was ever kept");
        let (spec, e) = run(6, 1);
        assert_eq!(spec, plain, "{:?}", cfg.arch);
        let drafted = e
            .stats()
            .draft_tokens
            .load(std::sync::atomic::Ordering::Relaxed);
        let accepted = e
            .stats()
            .accepted_draft_tokens
            .load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("{:?}: drafted {drafted}, accepted {accepted}", cfg.arch);
        assert!(
            drafted > 0 && accepted > 0,
            "drafted {drafted}, accepted {accepted}"
        );
        // Fewer forwards than tokens: accepted drafts save steps.
        assert!(e.stats().steps.load(std::sync::atomic::Ordering::Relaxed) < 6 * 48);
    }
}

/// A drafter that proposes nothing and records which sequences were released.
struct RecordingDrafter(std::sync::Arc<std::sync::Mutex<Vec<u64>>>);

impl tandem_engine::draft::Drafter for RecordingDrafter {
    fn propose(
        &mut self,
        reqs: &[tandem_engine::draft::DraftRequest<'_>],
    ) -> Vec<tandem_engine::draft::Draft> {
        vec![Default::default(); reqs.len()]
    }
    fn feedback(&mut self, _seq: u64, _proposed: usize, _accepted: usize) {}
    fn release(&mut self, seq: u64) {
        self.0.lock().unwrap().push(seq);
    }
}

/// A cancelled sequence's drafter state (a draft service's KV) is released at once, as a
/// finished one's is, not left to the draft's idle eviction (issue 15, probe item 4).
#[test]
fn cancelling_releases_the_drafters_state_at_once() {
    let tiny = tiny_model(&TinyConfig::llama()).unwrap();
    let released = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let e = Engine::start_with(
        Model::load(&tiny.dir, &LoadOptions::default()).unwrap(),
        EngineConfig::default(),
        tandem_engine::EngineParts {
            draft_model: Some(Box::new(RecordingDrafter(released.clone()))),
            ..Default::default()
        },
    );
    let spec = Speculation {
        mode: SpecMode::DraftModel,
        ..Speculation::default()
    };
    // One that finishes and one cancelled mid-stream.
    let done = e
        .submit(Request {
            speculation: spec,
            ..greedy(prompts()[0].clone(), 4)
        })
        .unwrap();
    let done_id = done.id;
    done.collect_blocking().unwrap();
    // Cancelled at many points of their streams: some cancels reach the engine between steps
    // (its command path), some within one (its closed-stream check); both must release.
    let mut gens: Vec<_> = (0..24)
        .map(|i| {
            e.submit(Request {
                ignore_eos: true,
                speculation: spec,
                ..greedy(prompts()[i % 8].clone(), 400)
            })
            .unwrap()
        })
        .collect();
    let ids: Vec<u64> = gens.iter().map(|g| g.id).collect();
    for (i, mut g) in gens.drain(..).enumerate() {
        for _ in 0..(1 + i % 3) {
            assert!(matches!(g.events.blocking_recv(), Some(Event::Token(_))));
        }
        std::thread::sleep(Duration::from_micros(300 * (i as u64 % 4)));
        drop(g);
    }
    // Bounds only a hang: each release comes with the engine's next command or step.
    let start = std::time::Instant::now();
    while !ids.iter().all(|id| released.lock().unwrap().contains(id)) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "never released: {:?}",
            ids.iter()
                .filter(|id| !released.lock().unwrap().contains(id))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(released.lock().unwrap().contains(&done_id));
}

/// A request that cannot start within `max_queue_time` fails with QueueTimeout (RESOURCE_EXHAUSTED
/// at the worker) instead of waiting on; one whose client deadline passes while it waits is
/// never started; the running request is not disturbed (issue 15, probe item 6).
#[test]
fn waiting_requests_expire_by_queue_time_and_by_deadline() {
    // A long context, so the running request outlasts the limits many times over.
    let tiny = tiny_model(&TinyConfig {
        max_position_embeddings: 2048,
        hidden_size: 256,
        intermediate_size: 1024,
        ..TinyConfig::llama()
    })
    .unwrap();
    let e = engine(
        &tiny,
        EngineConfig {
            max_running: 1,
            max_queue_time: Some(Duration::from_millis(100)),
            ..Default::default()
        },
    );
    // Occupies the one running place for far longer than the queue limit.
    let mut long = e
        .submit(Request {
            ignore_eos: true,
            ..greedy(prompts()[0].clone(), 1900)
        })
        .unwrap();
    assert!(matches!(long.events.blocking_recv(), Some(Event::Token(_))));
    let started = std::time::Instant::now();
    let queued = e.submit(greedy(prompts()[1].clone(), 4)).unwrap();
    let with_deadline = e
        .submit_with_deadline(
            greedy(prompts()[2].clone(), 4),
            Some(std::time::Instant::now() + Duration::from_millis(50)),
        )
        .unwrap();
    match with_deadline.collect_blocking() {
        Err(EngineError::DeadlineExceeded { waited_ms }) => assert!(waited_ms >= 50),
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    match queued.collect_blocking() {
        Err(EngineError::QueueTimeout {
            waited_ms,
            limit_ms,
        }) => {
            assert_eq!(limit_ms, 100);
            assert!(waited_ms >= 100, "{waited_ms}");
        }
        other => panic!("expected QueueTimeout, got {other:?}"),
    }
    // Bounds only a hang: both failed while the long request still ran.
    assert!(started.elapsed() < Duration::from_secs(60));
    let mut rest = 0;
    while let Some(ev) = long.events.blocking_recv() {
        match ev {
            Event::Token(_) => rest += 1,
            Event::Finished { reason, .. } => {
                assert_eq!(reason, FinishReason::Length);
                break;
            }
            Event::Error(e) => panic!("the running request failed: {e}"),
        }
    }
    assert_eq!(rest, 1899);
    let msg = EngineError::QueueTimeout {
        waited_ms: 301,
        limit_ms: 300,
    }
    .to_string();
    assert!(
        msg.contains("max_queue_time") && msg.contains("300 ms"),
        "{msg}"
    );
}
