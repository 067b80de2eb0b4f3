//! Unit tests of the state machine: each command's effect, retries, job fencing,
//! determinism, and snapshots.

use super::*;

const T0: u64 = 1_700_000_000_000;

/// Applies commands with fresh ids 1, 2, 3, ... and times T0, T0 + 1000, ...
struct Driver {
    state: ClusterState,
    next_id: CommandId,
}

impl Driver {
    fn new() -> Driver {
        Driver {
            state: ClusterState::new(),
            next_id: 1,
        }
    }

    fn env(&mut self, command: Command) -> CommandEnvelope {
        let id = self.next_id;
        self.next_id += 1;
        CommandEnvelope {
            id,
            issued_at_ms: T0 + (id as u64) * 1000,
            command,
        }
    }

    fn run(&mut self, command: Command) -> ApplyOutcome {
        let env = self.env(command);
        self.state.apply(&env)
    }

    /// Applies at a given time.
    fn run_at(&mut self, now: u64, command: Command) -> ApplyOutcome {
        let mut env = self.env(command);
        env.issued_at_ms = now;
        self.state.apply(&env)
    }
}

fn node(id: NodeId, name: &str) -> NodeRecord {
    NodeRecord {
        id,
        name: name.into(),
        cluster_addr: format!("10.0.0.{id}:7100"),
        http_addr: format!("10.0.0.{id}:8080"),
        devices: vec![DeviceRecord {
            id: "cuda:0".into(),
            kind: "cuda".into(),
            name: "NVIDIA H100".into(),
            total_memory: 80 << 30,
        }],
        labels: [("zone".to_string(), "a".to_string())]
            .into_iter()
            .collect(),
        status: NodeStatus::Up,
        role: NodeRole::Voter,
    }
}

fn model(name: &str, versions: &[&str]) -> ModelRecord {
    ModelRecord {
        name: name.into(),
        engine: "onnx".into(),
        path: Some(format!("models/{name}.onnx")),
        versions: versions
            .iter()
            .map(|v| (v.to_string(), VersionRecord { published: true }))
            .collect(),
    }
}

fn deployment(model: &str) -> Deployment {
    Deployment {
        model: model.into(),
        min_replicas: 1,
        max_replicas: 4,
        desired_replicas: 2,
        device_policy: "auto".into(),
        target_load: 8.0,
        traffic: [("1".to_string(), 100)].into_iter().collect(),
    }
}

fn assignment(replica: &str, model: &str, node_id: NodeId) -> Assignment {
    Assignment {
        replica_id: replica.into(),
        model: model.into(),
        version: "1".into(),
        node_id,
        device: "cuda:0".into(),
    }
}

fn token(id: &str) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        name: format!("{id} token"),
        key_hash: vec![7; 32],
        role: TokenRole::User,
        allowed_models: vec!["mlp".into()],
        ip_allow: vec!["10.0.0.0/8".into()],
        rate_per_minute: Some(600),
        monthly_quota: Some(1_000_000),
        used: 0,
        used_month: 0,
        expires_at_ms: None,
        status: TokenStatus::Active,
        created_at_ms: T0,
        created_by: "local".into(),
    }
}

fn meta(action: &str, target: &str) -> AuditMeta {
    AuditMeta {
        who: "admin1".into(),
        action: action.into(),
        target: target.into(),
        request_id: "req-1".into(),
        client_ip: "127.0.0.1".into(),
        detail: "{}".into(),
    }
}

fn job(id: &str, model: &str) -> JobRecord {
    JobRecord {
        id: id.into(),
        model: model.into(),
        status: JobStatus::Succeeded, // ignored: a submitted job starts queued
        payload: b"{\"inputs\":[1,2,3]}".to_vec(),
        result: Some(b"forged".to_vec()),
        error: None,
        lease: None,
        attempts: 9,
        created_at_ms: 0,
        updated_at_ms: 0,
    }
}

fn lease(id: &str, node_id: NodeId, epoch: u64, expires_at_ms: u64) -> Command {
    Command::LeaseJob {
        id: id.into(),
        node_id,
        epoch,
        expires_at_ms,
    }
}

fn complete(id: &str, epoch: u64, result: Result<&[u8], &str>) -> Command {
    Command::CompleteJob {
        id: id.into(),
        epoch,
        result: result.map(<[u8]>::to_vec).map_err(str::to_string),
    }
}

fn rejected(outcome: &ApplyOutcome) -> &Rejection {
    match outcome {
        ApplyOutcome::Rejected(r) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// A driver whose state has nodes 1 and 2, model `mlp` (versions 1 and 2) and its
/// deployment.
fn populated() -> Driver {
    let mut d = Driver::new();
    assert_eq!(
        d.run(Command::UpsertNode(node(1, "gpu-1"))),
        ApplyOutcome::Applied
    );
    assert_eq!(
        d.run(Command::UpsertNode(node(2, "gpu-2"))),
        ApplyOutcome::Applied
    );
    assert_eq!(
        d.run(Command::RegisterModel(model("mlp", &["1", "2"]))),
        ApplyOutcome::Applied
    );
    assert_eq!(
        d.run(Command::UpsertDeployment(deployment("mlp"))),
        ApplyOutcome::Applied
    );
    d
}

#[test]
fn nodes_upsert_status_remove() {
    let mut d = populated();
    assert_eq!(d.state.nodes[&1].name, "gpu-1");

    let mut changed = node(1, "gpu-1");
    changed.http_addr = "10.0.0.1:9090".into();
    assert_eq!(d.run(Command::UpsertNode(changed)), ApplyOutcome::Applied);
    assert_eq!(d.state.nodes[&1].http_addr, "10.0.0.1:9090");

    // Names are unique; id 0 is Raft's "none".
    assert!(matches!(
        rejected(&d.run(Command::UpsertNode(node(3, "gpu-1")))),
        Rejection::Conflict(_)
    ));
    assert!(matches!(
        rejected(&d.run(Command::UpsertNode(node(0, "zero")))),
        Rejection::Invalid(_)
    ));

    let down = Command::SetNodeStatus {
        id: 2,
        status: NodeStatus::Down,
    };
    assert_eq!(d.run(down.clone()), ApplyOutcome::Applied);
    assert_eq!(d.state.nodes[&2].status, NodeStatus::Down);
    assert_eq!(d.run(down), ApplyOutcome::Unchanged);
    assert_eq!(
        rejected(&d.run(Command::SetNodeStatus {
            id: 9,
            status: NodeStatus::Up
        })),
        &Rejection::NotFound {
            kind: Entity::Node,
            id: "9".into()
        }
    );

    // A removed node keeps its tombstone and cannot come back under its id.
    assert_eq!(
        d.run(Command::SetNodeStatus {
            id: 2,
            status: NodeStatus::Removed
        }),
        ApplyOutcome::Applied
    );
    assert!(matches!(
        rejected(&d.run(Command::UpsertNode(node(2, "gpu-2")))),
        Rejection::Conflict(_)
    ));
    assert!(matches!(
        rejected(&d.run(Command::SetNodeStatus {
            id: 2,
            status: NodeStatus::Up
        })),
        Rejection::Conflict(_)
    ));
    // Its name is free again.
    assert_eq!(
        d.run(Command::UpsertNode(node(3, "gpu-2"))),
        ApplyOutcome::Applied
    );

    // RemoveNode marks the node removed (a tombstone) and drops the replicas placed on it.
    assert_eq!(
        d.run(Command::SetAssignments {
            model: "mlp".into(),
            assignments: vec![assignment("r1", "mlp", 1), assignment("r3", "mlp", 3)],
        }),
        ApplyOutcome::Applied
    );
    assert_eq!(d.run(Command::RemoveNode { id: 3 }), ApplyOutcome::Applied);
    assert_eq!(d.state.nodes[&3].status, NodeStatus::Removed);
    assert_eq!(d.state.assignments.keys().collect::<Vec<_>>(), vec!["r1"]);
    assert_eq!(
        d.run(Command::RemoveNode { id: 3 }),
        ApplyOutcome::Unchanged
    );
    // A removed node cannot come back under its id.
    assert!(matches!(
        rejected(&d.run(Command::UpsertNode(node(3, "gpu-2")))),
        Rejection::Conflict(_)
    ));
    assert!(matches!(
        rejected(&d.run(Command::RemoveNode { id: 99 })),
        Rejection::NotFound { .. }
    ));
}

#[test]
fn models_register_only_if_absent() {
    let mut d = populated();
    let mut other = model("mlp", &["9"]);
    other.engine = "candle-mlp".into();
    assert_eq!(
        d.run(Command::RegisterModel(other)),
        ApplyOutcome::Unchanged
    );
    assert_eq!(d.state.models["mlp"], model("mlp", &["1", "2"]));
    assert!(matches!(
        rejected(&d.run(Command::RegisterModel(model("", &[])))),
        Rejection::Invalid(_)
    ));
}

#[test]
fn versions_publish_and_unpublish() {
    let mut d = populated();
    let unpublish = Command::SetVersionPublished {
        model: "mlp".into(),
        version: "2".into(),
        published: false,
    };
    assert_eq!(d.run(unpublish.clone()), ApplyOutcome::Applied);
    assert!(!d.state.models["mlp"].versions["2"].published);
    assert_eq!(d.run(unpublish), ApplyOutcome::Unchanged);
    // A new version is added.
    assert_eq!(
        d.run(Command::SetVersionPublished {
            model: "mlp".into(),
            version: "3".into(),
            published: true,
        }),
        ApplyOutcome::Applied
    );
    assert!(d.state.models["mlp"].versions["3"].published);
    assert!(matches!(
        rejected(&d.run(Command::SetVersionPublished {
            model: "nope".into(),
            version: "1".into(),
            published: true,
        })),
        Rejection::NotFound {
            kind: Entity::Model,
            ..
        }
    ));
}

#[test]
fn deployments_are_validated() {
    let mut d = populated();
    assert_eq!(d.state.deployments["mlp"], deployment("mlp"));

    let mut scaled = deployment("mlp");
    scaled.desired_replicas = 4;
    scaled.traffic = [("1".to_string(), 90), ("2".to_string(), 10)]
        .into_iter()
        .collect();
    assert_eq!(
        d.run(Command::UpsertDeployment(scaled.clone())),
        ApplyOutcome::Applied
    );
    assert_eq!(d.state.deployments["mlp"], scaled);

    let bad = |f: fn(&mut Deployment)| {
        let mut dep = deployment("mlp");
        f(&mut dep);
        Command::UpsertDeployment(dep)
    };
    for cmd in [
        bad(|d| d.min_replicas = 5),
        bad(|d| d.desired_replicas = 0),
        bad(|d| d.desired_replicas = 5),
        bad(|d| d.target_load = f64::NAN),
        bad(|d| d.target_load = 0.0),
    ] {
        assert!(matches!(rejected(&d.run(cmd)), Rejection::Invalid(_)));
    }
    assert!(matches!(
        rejected(&d.run(bad(|d| {
            d.traffic.insert("7".into(), 1);
        }))),
        Rejection::NotFound {
            kind: Entity::Version,
            ..
        }
    ));
    assert!(matches!(
        rejected(&d.run(bad(|d| d.model = "nope".into()))),
        Rejection::NotFound {
            kind: Entity::Model,
            ..
        }
    ));
    // Nothing refused changed the deployment.
    assert_eq!(d.state.deployments["mlp"], scaled);
}

#[test]
fn assignments_replace_a_models_replicas() {
    let mut d = populated();
    d.run(Command::RegisterModel(model("bert", &["1"])));
    let set = |model: &str, list: Vec<Assignment>| Command::SetAssignments {
        model: model.into(),
        assignments: list,
    };
    assert_eq!(
        d.run(set(
            "mlp",
            vec![assignment("m1", "mlp", 1), assignment("m2", "mlp", 2)]
        )),
        ApplyOutcome::Applied
    );
    assert_eq!(
        d.run(set("bert", vec![assignment("b1", "bert", 2)])),
        ApplyOutcome::Applied
    );
    assert_eq!(
        d.run(set("mlp", vec![assignment("m3", "mlp", 2)])),
        ApplyOutcome::Applied
    );
    let ids: Vec<&String> = d.state.assignments.keys().collect();
    assert_eq!(ids, vec!["b1", "m3"]);
    assert_eq!(d.state.assignments_of("mlp").count(), 1);

    for (cmd, what) in [
        (set("mlp", vec![assignment("x", "bert", 1)]), "wrong model"),
        (
            set(
                "mlp",
                vec![assignment("x", "mlp", 1), assignment("x", "mlp", 2)],
            ),
            "repeated id",
        ),
        (set("mlp", vec![assignment("", "mlp", 1)]), "empty id"),
    ] {
        assert!(
            matches!(rejected(&d.run(cmd)), Rejection::Invalid(_)),
            "{what}"
        );
    }
    assert!(matches!(
        rejected(&d.run(set("mlp", vec![assignment("x", "mlp", 9)]))),
        Rejection::NotFound {
            kind: Entity::Node,
            ..
        }
    ));
    assert!(matches!(
        rejected(&d.run(set("mlp", vec![assignment("b1", "mlp", 1)]))),
        Rejection::Conflict(_)
    ));
    assert!(matches!(
        rejected(&d.run(set("nope", vec![assignment("x", "nope", 1)]))),
        Rejection::NotFound {
            kind: Entity::Model,
            ..
        }
    ));
    // Clearing an unknown model's replicas is harmless.
    assert_eq!(d.run(set("nope", vec![])), ApplyOutcome::Applied);
    assert_eq!(d.state.assignments.len(), 2);

    // Removing a model drops its deployment and replicas.
    assert_eq!(
        d.run(Command::RemoveModel { name: "mlp".into() }),
        ApplyOutcome::Applied
    );
    assert!(!d.state.models.contains_key("mlp"));
    assert!(!d.state.deployments.contains_key("mlp"));
    assert_eq!(d.state.assignments.keys().collect::<Vec<_>>(), vec!["b1"]);
}

#[test]
fn token_usage_counts_per_calendar_month() {
    let mut d = populated();
    d.run(Command::UpsertToken(token("t1")));
    // 2026-11-30T23:59:59Z, then 2026-12-01T00:00:01Z.
    let nov = 1_796_083_199_000;
    let dec = 1_796_083_201_000;
    let usage = |amount| Command::RecordTokenUsage {
        id: "t1".into(),
        amount,
    };
    d.run_at(nov, usage(7));
    assert_eq!(d.state.tokens["t1"].used_in(nov), 7);
    assert_eq!(
        d.state.tokens["t1"].used_in(dec),
        0,
        "a new month starts at 0"
    );
    d.run_at(dec, usage(2));
    assert_eq!(d.state.tokens["t1"].used_in(dec), 2);
    // November's usage reported late does not count against December.
    d.run_at(nov, usage(100));
    assert_eq!(d.state.tokens["t1"].used_in(dec), 2);
    // An update of the token keeps the count.
    d.run_at(dec, Command::UpsertToken(token("t1")));
    assert_eq!(d.state.tokens["t1"].used_in(dec), 2);
}

#[test]
fn audited_commands_record_who_what_and_the_outcome() {
    let mut d = populated();
    let out = d.run(Command::Audited {
        meta: meta("token.create", "t1"),
        command: Box::new(Command::UpsertToken(token("t1"))),
    });
    assert_eq!(out, ApplyOutcome::Applied);
    assert!(d.state.tokens.contains_key("t1"));
    let out = d.run(Command::Audited {
        meta: meta("token.revoke", "t9"),
        command: Box::new(Command::RevokeToken { id: "t9".into() }),
    });
    assert!(matches!(out, ApplyOutcome::Rejected(_)));
    d.run(Command::Audit(meta("model.scale", "mlp")));
    let entries: Vec<_> = d.state.audit.iter().collect();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0].seq, 1);
    assert_eq!(entries[0].meta.action, "token.create");
    assert_eq!(entries[0].outcome, "ok");
    assert!(
        entries[1].outcome.starts_with("rejected"),
        "{}",
        entries[1].outcome
    );
    assert_eq!(entries[2].meta.action, "model.scale");
    assert_eq!(entries[2].seq, 3);
    // Nesting is refused.
    let nested = Command::Audited {
        meta: meta("x", "y"),
        command: Box::new(Command::Audit(meta("a", "b"))),
    };
    let doubly = Command::Audited {
        meta: meta("x", "y"),
        command: Box::new(nested),
    };
    assert!(matches!(d.run(doubly), ApplyOutcome::Rejected(_)));
}

#[test]
fn the_last_admin_token_cannot_be_revoked_paused_or_demoted() {
    let mut d = populated();
    let mut admin = token("a1");
    admin.role = TokenRole::Admin;
    d.run(Command::UpsertToken(admin.clone()));
    d.run(Command::UpsertToken(token("u1")));
    let conflict = |o: ApplyOutcome| matches!(o, ApplyOutcome::Rejected(Rejection::Conflict(_)));
    assert!(conflict(d.run(Command::RevokeToken { id: "a1".into() })));
    let mut paused = admin.clone();
    paused.status = TokenStatus::Paused;
    assert!(conflict(d.run(Command::UpsertToken(paused.clone()))));
    let mut demoted = admin.clone();
    demoted.role = TokenRole::User;
    assert!(conflict(d.run(Command::UpsertToken(demoted))));
    let mut expiring = admin.clone();
    expiring.expires_at_ms = Some(1);
    assert!(conflict(d.run(Command::UpsertToken(expiring))));
    // Users come and go freely.
    assert_eq!(
        d.run(Command::RevokeToken { id: "u1".into() }),
        ApplyOutcome::Applied
    );
    // With a second admin, the first may go.
    let mut second = token("a2");
    second.role = TokenRole::Admin;
    d.run(Command::UpsertToken(second));
    assert_eq!(d.run(Command::UpsertToken(paused)), ApplyOutcome::Applied);
    assert!(conflict(d.run(Command::RevokeToken { id: "a2".into() })));
}

#[test]
fn the_audit_log_is_bounded() {
    let mut d = Driver::new();
    for i in 0..(AUDIT_CAPACITY + 5) {
        d.run(Command::Audit(meta("model.scale", &i.to_string())));
    }
    assert_eq!(d.state.audit.len(), AUDIT_CAPACITY);
    assert_eq!(d.state.audit.front().map(|e| e.seq), Some(6));
    assert_eq!(d.state.audit_seq, (AUDIT_CAPACITY + 5) as u64);
}

fn update(before: TokenRecord, after: TokenRecord) -> Command {
    Command::UpdateToken {
        before: Box::new(before),
        after: Box::new(after),
    }
}

#[test]
fn a_token_update_applies_only_to_the_settings_it_read() {
    let mut d = populated();
    d.run(Command::UpsertToken(token("t1")));
    let read = d.state.tokens["t1"].clone();
    // Usage counted since the read is not a conflict, and is kept.
    d.run(Command::RecordTokenUsage {
        id: "t1".into(),
        amount: 3,
    });
    let mut renamed = read.clone();
    renamed.name = "renamed".into();
    assert_eq!(
        d.run(update(read.clone(), renamed.clone())),
        ApplyOutcome::Applied
    );
    assert_eq!(d.state.tokens["t1"].name, "renamed");
    assert_eq!(d.state.tokens["t1"].used, 3);
    // A second update made from the same (now old) read would undo the rename: refused.
    let mut paused = read.clone();
    paused.status = TokenStatus::Paused;
    assert!(matches!(
        rejected(&d.run(update(read, paused.clone()))),
        Rejection::Conflict(_)
    ));
    assert_eq!(d.state.tokens["t1"].name, "renamed");
    assert_eq!(d.state.tokens["t1"].status, TokenStatus::Active);
    // Read again, it applies, and keeps the rename.
    let mut paused = d.state.tokens["t1"].clone();
    paused.status = TokenStatus::Paused;
    let before = d.state.tokens["t1"].clone();
    assert_eq!(d.run(update(before, paused)), ApplyOutcome::Applied);
    assert_eq!(d.state.tokens["t1"].name, "renamed");
    assert_eq!(d.state.tokens["t1"].status, TokenStatus::Paused);
    // No such token; an id that changes; a revoked token.
    let ghost = token("t9");
    assert!(matches!(
        rejected(&d.run(update(ghost.clone(), ghost))),
        Rejection::NotFound { .. }
    ));
    let before = d.state.tokens["t1"].clone();
    assert!(matches!(
        rejected(&d.run(update(before.clone(), token("t2")))),
        Rejection::Invalid(_)
    ));
    d.run(Command::RevokeToken { id: "t1".into() });
    let revoked = d.state.tokens["t1"].clone();
    assert!(matches!(
        rejected(&d.run(update(
            revoked.clone(),
            TokenRecord {
                status: TokenStatus::Active,
                ..revoked
            }
        ))),
        Rejection::Conflict(_)
    ));
    assert_eq!(d.state.tokens["t1"].status, TokenStatus::Revoked);
}

#[test]
fn tokens_upsert_usage_revoke() {
    let mut d = populated();
    assert_eq!(
        d.run(Command::UpsertToken(token("t1"))),
        ApplyOutcome::Applied
    );
    assert_eq!(
        d.run(Command::RecordTokenUsage {
            id: "t1".into(),
            amount: 5
        }),
        ApplyOutcome::Applied
    );
    assert_eq!(d.state.tokens["t1"].used, 5);

    // An update keeps the usage count.
    let mut updated = token("t1");
    updated.rate_per_minute = Some(60);
    assert_eq!(d.run(Command::UpsertToken(updated)), ApplyOutcome::Applied);
    assert_eq!(d.state.tokens["t1"].rate_per_minute, Some(60));
    assert_eq!(d.state.tokens["t1"].used, 5);

    // Usage saturates instead of overflowing.
    d.run(Command::RecordTokenUsage {
        id: "t1".into(),
        amount: u64::MAX,
    });
    assert_eq!(d.state.tokens["t1"].used, u64::MAX);

    let revoke = Command::RevokeToken { id: "t1".into() };
    assert_eq!(d.run(revoke.clone()), ApplyOutcome::Applied);
    assert_eq!(d.state.tokens["t1"].status, TokenStatus::Revoked);
    assert_eq!(d.run(revoke), ApplyOutcome::Unchanged);
    // Revocation is final.
    assert!(matches!(
        rejected(&d.run(Command::UpsertToken(token("t1")))),
        Rejection::Conflict(_)
    ));
    assert_eq!(d.state.tokens["t1"].status, TokenStatus::Revoked);
    assert!(matches!(
        rejected(&d.run(Command::RevokeToken { id: "t9".into() })),
        Rejection::NotFound {
            kind: Entity::Token,
            ..
        }
    ));
}

#[test]
fn job_lifecycle() {
    let mut d = populated();
    let submit_at = T0 + 50_000;
    assert_eq!(
        d.run_at(submit_at, Command::SubmitJob(job("j1", "mlp"))),
        ApplyOutcome::Applied
    );
    let j = &d.state.jobs["j1"];
    // Status, result, attempts and times come from the state machine, not the proposer.
    assert_eq!(j.status, JobStatus::Queued);
    assert_eq!(j.result, None);
    assert_eq!(j.attempts, 0);
    assert_eq!((j.created_at_ms, j.updated_at_ms), (submit_at, submit_at));
    assert_eq!(j.payload, job("j1", "mlp").payload);

    assert!(matches!(
        rejected(&d.run(Command::SubmitJob(job("j1", "mlp")))),
        Rejection::Conflict(_)
    ));
    assert!(matches!(
        rejected(&d.run(Command::SubmitJob(job("j2", "nope")))),
        Rejection::NotFound {
            kind: Entity::Model,
            ..
        }
    ));

    let now = T0 + 100_000;
    assert_eq!(
        d.run_at(now, lease("j1", 1, 1, now + 30_000)),
        ApplyOutcome::Applied
    );
    let j = &d.state.jobs["j1"];
    assert_eq!(j.status, JobStatus::Running);
    assert_eq!(j.attempts, 1);
    assert_eq!(
        j.lease,
        Some(Lease {
            node_id: 1,
            epoch: 1,
            expires_at_ms: now + 30_000
        })
    );
    // The holder renews.
    assert_eq!(
        d.run_at(now + 10_000, lease("j1", 1, 1, now + 60_000)),
        ApplyOutcome::Applied
    );
    assert_eq!(
        d.state.jobs["j1"].lease.unwrap().expires_at_ms,
        now + 60_000
    );
    assert_eq!(d.state.jobs["j1"].attempts, 1);
    // A lease must end in the future.
    assert!(matches!(
        rejected(&d.run_at(now + 10_000, lease("j1", 1, 1, now + 10_000))),
        Rejection::Invalid(_)
    ));

    assert_eq!(
        d.run_at(now + 20_000, complete("j1", 1, Ok(b"answer"))),
        ApplyOutcome::Applied
    );
    let j = &d.state.jobs["j1"];
    assert_eq!(j.status, JobStatus::Succeeded);
    assert_eq!(j.result.as_deref(), Some(&b"answer"[..]));
    assert_eq!(j.updated_at_ms, now + 20_000);
    // A finished job cannot be leased or cancelled.
    assert!(matches!(
        rejected(&d.run(lease("j1", 2, 2, u64::MAX))),
        Rejection::Conflict(_)
    ));
    assert_eq!(
        d.run(Command::CancelJob { id: "j1".into() }),
        ApplyOutcome::Unchanged
    );
    assert_eq!(d.state.jobs["j1"].status, JobStatus::Succeeded);

    // A failure is recorded as such.
    d.run(Command::SubmitJob(job("j3", "mlp")));
    d.run_at(now, lease("j3", 2, 1, now + 1000));
    assert_eq!(
        d.run_at(now + 1, complete("j3", 1, Err("engine exploded"))),
        ApplyOutcome::Applied
    );
    assert_eq!(d.state.jobs["j3"].status, JobStatus::Failed);
    assert_eq!(d.state.jobs["j3"].error.as_deref(), Some("engine exploded"));

    // Unknown jobs.
    for cmd in [
        lease("jx", 1, 1, u64::MAX),
        complete("jx", 1, Ok(b"")),
        Command::CancelJob { id: "jx".into() },
    ] {
        assert!(matches!(
            rejected(&d.run(cmd)),
            Rejection::NotFound {
                kind: Entity::Job,
                ..
            }
        ));
    }
}

#[test]
fn job_completion_is_fenced_by_epoch_and_published_once() {
    let mut d = populated();
    d.run(Command::SubmitJob(job("j", "mlp")));
    let t = T0 + 1_000_000;

    // Completing a job nobody leased is refused.
    assert_eq!(
        rejected(&d.run_at(t, complete("j", 1, Ok(b"early")))),
        &Rejection::StaleEpoch {
            job: "j".into(),
            current: 0,
            given: 1
        }
    );

    // Node 1 leases it (epoch 1) and goes silent.
    assert_eq!(
        d.run_at(t, lease("j", 1, 1, t + 30_000)),
        ApplyOutcome::Applied
    );
    // Node 2 cannot take it over while the lease holds...
    assert!(matches!(
        rejected(&d.run_at(t + 29_999, lease("j", 2, 2, t + 60_000))),
        Rejection::Conflict(_)
    ));
    // ...nor reuse the old epoch once it expired...
    assert!(matches!(
        rejected(&d.run_at(t + 30_000, lease("j", 2, 1, t + 60_000))),
        Rejection::StaleEpoch {
            current: 1,
            given: 1,
            ..
        }
    ));
    // ...but takes it over with a higher epoch.
    assert_eq!(
        d.run_at(t + 30_000, lease("j", 2, 2, t + 60_000)),
        ApplyOutcome::Applied
    );
    assert_eq!(d.state.jobs["j"].attempts, 2);

    // The first runner comes back and tries to publish: fenced.
    assert_eq!(
        rejected(&d.run_at(t + 31_000, complete("j", 1, Ok(b"from node 1")))),
        &Rejection::StaleEpoch {
            job: "j".into(),
            current: 2,
            given: 1
        }
    );
    // Nor may it renew its old lease.
    assert!(matches!(
        rejected(&d.run_at(t + 31_000, lease("j", 1, 1, t + 90_000))),
        Rejection::Conflict(_)
    ));
    assert_eq!(d.state.jobs["j"].status, JobStatus::Running);

    // The current holder publishes.
    assert_eq!(
        d.run_at(t + 32_000, complete("j", 2, Ok(b"from node 2"))),
        ApplyOutcome::Applied
    );
    // A second completion, even with the right epoch, changes nothing.
    assert_eq!(
        d.run_at(t + 33_000, complete("j", 2, Ok(b"again"))),
        ApplyOutcome::Unchanged
    );
    assert_eq!(
        d.run_at(t + 33_000, complete("j", 2, Err("late failure"))),
        ApplyOutcome::Unchanged
    );
    let j = &d.state.jobs["j"];
    assert_eq!(j.status, JobStatus::Succeeded);
    assert_eq!(j.result.as_deref(), Some(&b"from node 2"[..]));
    assert_eq!(j.error, None);
    assert_eq!(j.updated_at_ms, t + 32_000);
}

#[test]
fn cancelled_job_ignores_late_results() {
    let mut d = populated();
    d.run(Command::SubmitJob(job("j", "mlp")));
    d.run_at(T0, lease("j", 1, 1, T0 + 10_000));
    assert_eq!(
        d.run(Command::CancelJob { id: "j".into() }),
        ApplyOutcome::Applied
    );
    assert_eq!(d.state.jobs["j"].status, JobStatus::Cancelled);
    assert_eq!(
        d.run_at(T0 + 1, complete("j", 1, Ok(b"too late"))),
        ApplyOutcome::Unchanged
    );
    assert_eq!(d.state.jobs["j"].result, None);
}

#[test]
fn a_retried_command_is_applied_once() {
    let mut d = populated();
    d.run(Command::UpsertToken(token("t")));
    let usage = d.env(Command::RecordTokenUsage {
        id: "t".into(),
        amount: 3,
    });
    assert_eq!(d.state.apply(&usage), ApplyOutcome::Applied);
    assert!(d.state.was_applied(usage.id));
    let before = d.state.clone();
    // The same proposal, committed again after a leader change, is not counted twice.
    assert_eq!(d.state.apply(&usage), ApplyOutcome::Duplicate);
    assert_eq!(d.state, before);
    assert_eq!(d.state.tokens["t"].used, 3);

    // A refused command is remembered too: its retry is a duplicate, not a second try.
    let bad = d.env(Command::CancelJob { id: "nope".into() });
    assert!(matches!(d.state.apply(&bad), ApplyOutcome::Rejected(_)));
    assert_eq!(d.state.apply(&bad), ApplyOutcome::Duplicate);
}

#[test]
fn applied_ids_are_bounded() {
    let mut state = ClusterState::new();
    let cmd = |id: CommandId| CommandEnvelope {
        id,
        issued_at_ms: T0,
        command: Command::RevokeToken { id: "none".into() },
    };
    let n = APPLIED_IDS_CAPACITY as CommandId;
    for id in 0..=n {
        assert!(matches!(state.apply(&cmd(id)), ApplyOutcome::Rejected(_)));
    }
    assert_eq!(state.applied_commands.order.len(), APPLIED_IDS_CAPACITY);
    assert_eq!(state.applied_commands.set.len(), APPLIED_IDS_CAPACITY);
    // The oldest id was forgotten; the newest are remembered.
    assert!(!state.was_applied(0));
    assert!(state.was_applied(1));
    assert_eq!(state.apply(&cmd(n)), ApplyOutcome::Duplicate);
    // The window survives a snapshot.
    let restored = ClusterState::restore(&state.snapshot()).unwrap();
    assert_eq!(restored, state);
    assert!(restored.was_applied(1));
    assert!(!restored.was_applied(0));
}

/// A small deterministic generator, so the mixed-command tests need no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, items: &'a [&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// A long mixed sequence of valid, invalid and repeated commands.
fn mixed_commands(seed: u64, n: usize) -> Vec<CommandEnvelope> {
    let mut rng = XorShift(seed);
    let names = ["a", "b", "c", ""];
    let models = ["mlp", "bert", "nope"];
    let mut out: Vec<CommandEnvelope> = Vec::new();
    for i in 0..n {
        let node_id = rng.next() % 4;
        let job_id = rng.pick(&names).to_string();
        let model_name = rng.pick(&models).to_string();
        let epoch = rng.next() % 4;
        let now = T0 + (i as u64) * 1000;
        let command = match rng.next() % 19 {
            0 => Command::UpsertNode(node(node_id, rng.pick(&names))),
            1 => Command::SetNodeStatus {
                id: node_id,
                status: [NodeStatus::Up, NodeStatus::Down, NodeStatus::Removed]
                    [(rng.next() % 3) as usize],
            },
            2 => Command::RemoveNode { id: node_id },
            3 => Command::RegisterModel(model(&model_name, &["1", "2"])),
            4 => Command::UpsertDeployment(deployment(&model_name)),
            5 => Command::SetAssignments {
                model: model_name.clone(),
                assignments: vec![assignment(rng.pick(&names), &model_name, node_id)],
            },
            6 => Command::UpsertToken(token(rng.pick(&names))),
            7 => Command::RevokeToken {
                id: rng.pick(&names).into(),
            },
            8 => Command::SubmitJob(job(&job_id, &model_name)),
            9 | 10 => lease(&job_id, node_id, epoch, now + rng.next() % 5000),
            11 => Command::CompleteJob {
                id: job_id,
                epoch,
                result: if rng.next().is_multiple_of(2) {
                    Ok(vec![1, 2, 3])
                } else {
                    Err("boom".into())
                },
            },
            12 => Command::CancelJob { id: job_id },
            13 => Command::SetVersionPublished {
                model: model_name,
                version: rng.pick(&names).into(),
                published: rng.next().is_multiple_of(2),
            },
            14 => Command::RemoveModel { name: model_name },
            15 => Command::RecordTokenUsage {
                id: rng.pick(&names).into(),
                amount: rng.next() % 10,
            },
            16 => Command::Audit(meta("model.scale", &model_name)),
            17 => {
                let before = token(rng.pick(&names));
                let mut after = before.clone();
                after.rate_per_minute = Some((rng.next() % 100) as u32);
                update(before, after)
            }
            _ => Command::Audited {
                meta: meta("token.pause", rng.pick(&names)),
                command: Box::new(Command::UpsertToken(token(rng.pick(&names)))),
            },
        };
        // Now and then, a retry of an earlier envelope.
        if !out.is_empty() && rng.next().is_multiple_of(10) {
            let k = (rng.next() % out.len() as u64) as usize;
            out.push(out[k].clone());
            continue;
        }
        out.push(CommandEnvelope {
            id: u128::from(rng.next()) << 64 | i as u128,
            issued_at_ms: now,
            command,
        });
    }
    out
}

#[test]
fn apply_is_deterministic() {
    let commands = mixed_commands(0x5eed, 3000);
    let mut a = ClusterState::new();
    let mut b = ClusterState::new();
    let outcomes_a: Vec<ApplyOutcome> = commands.iter().map(|c| a.apply(c)).collect();
    let outcomes_b: Vec<ApplyOutcome> = commands.iter().map(|c| b.apply(c)).collect();
    assert_eq!(outcomes_a, outcomes_b);
    assert_eq!(a.snapshot(), b.snapshot());
    // The sequence exercised every kind of outcome.
    for want in ["Applied", "Unchanged", "Duplicate", "Rejected"] {
        assert!(
            outcomes_a
                .iter()
                .any(|o| format!("{o:?}").starts_with(want)),
            "no {want} outcome"
        );
    }
    assert!(!a.jobs.is_empty());
}

#[test]
fn snapshot_restores_an_equal_state() {
    let mut d = populated();
    d.run(Command::UpsertToken(token("t")));
    d.run(Command::SetAssignments {
        model: "mlp".into(),
        assignments: vec![assignment("r1", "mlp", 1)],
    });
    d.run(Command::SubmitJob(job("j", "mlp")));
    d.run_at(T0, lease("j", 1, 1, T0 + 5));
    let bytes = d.state.snapshot();
    let restored = ClusterState::restore(&bytes).unwrap();
    assert_eq!(restored, d.state);
    assert_eq!(restored.snapshot(), bytes);

    // Mixed states too, and a restored state goes on exactly like the original.
    let commands = mixed_commands(42, 2000);
    let (first, rest) = commands.split_at(1000);
    let mut original = ClusterState::new();
    first.iter().for_each(|c| {
        original.apply(c);
    });
    let mut copy = ClusterState::restore(&original.snapshot()).unwrap();
    assert_eq!(copy, original);
    for c in rest {
        assert_eq!(copy.apply(c), original.apply(c));
    }
    assert_eq!(copy.snapshot(), original.snapshot());

    // An empty state round-trips.
    let empty = ClusterState::new();
    assert_eq!(ClusterState::restore(&empty.snapshot()).unwrap(), empty);
}

#[test]
fn restore_refuses_bad_bytes() {
    let bytes = populated().state.snapshot();
    assert!(ClusterState::restore(&[]).is_err());
    let mut newer = bytes.clone();
    newer[0] = 2;
    assert!(matches!(
        ClusterState::restore(&newer),
        Err(ClusterError::UnsupportedFormat { found: 2, .. })
    ));
    for len in 1..bytes.len() {
        assert!(ClusterState::restore(&bytes[..len]).is_err(), "len {len}");
    }
    // Garbage never panics.
    let mut rng = XorShift(7);
    for _ in 0..2000 {
        let len = (rng.next() % 64) as usize;
        let mut junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if let Some(b) = junk.first_mut() {
            *b = FORMAT_V1_BYTE;
        }
        let _ = ClusterState::restore(&junk);
        let _ = CommandEnvelope::decode(&junk);
    }
    // A repeated command id in the window is refused (the same layout with distinct ids
    // decodes, so the refusal is about the repetition).
    let with_ids = |ids: Vec<u128>| {
        encode(&(
            BTreeMap::<NodeId, NodeRecord>::new(),
            BTreeMap::<String, ModelRecord>::new(),
            BTreeMap::<String, Deployment>::new(),
            BTreeMap::<String, Assignment>::new(),
            BTreeMap::<String, TokenRecord>::new(),
            BTreeMap::<String, JobRecord>::new(),
            String::new(),
            VecDeque::<AuditEntry>::new(),
            0u64,
            ids,
        ))
    };
    let ok = ClusterState::restore(&with_ids(vec![5, 6])).unwrap();
    assert!(ok.was_applied(5) && ok.was_applied(6));
    let dup = with_ids(vec![5, 5]);
    assert!(ClusterState::restore(&dup).is_err());
}

const FORMAT_V1_BYTE: u8 = crate::codec::FORMAT_V1;

#[test]
fn envelope_roundtrip() {
    for env in mixed_commands(3, 200) {
        let bytes = env.encode();
        assert_eq!(CommandEnvelope::decode(&bytes).unwrap(), env);
    }
}
