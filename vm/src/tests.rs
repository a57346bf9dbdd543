use super::*;
use dataplane::assets::address::{Locator, NodeNumber};

const OWNER: Owner = Owner([7; 32]);

fn runtime(memory: Option<Arc<MemoryAssets>>) -> Runtime {
    Runtime::new(&VmConfig::default(), 2, memory).unwrap()
}

fn compile(runtime: &Runtime, text: &str) -> Result<Compiled, ModuleError> {
    let bytes = wat::parse_str(text).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    runtime.compile(digest.as_ref().try_into().unwrap(), &bytes)
}

const LIMITS: Limits = Limits {
    fuel: 1_000_000,
    memory_bytes: 1 << 20,
};

#[test]
fn imports_outside_the_abi_and_missing_exports_are_refused_by_name() {
    let runtime = runtime(None);
    let refused = |text: &str| compile(&runtime, text).err().expect("refused").to_string();
    let wrong_type = r#"(module
        (import "internet2" "input" (func (param i64 i32) (result i32)))
        (memory (export "memory") 1)
        (func (export "run") (result i32) (i32.const 0)))"#;
    assert!(
        refused(wrong_type).contains("internet2.input"),
        "a wrong signature"
    );
    let other = r#"(module
        (import "env" "clock" (func))
        (memory (export "memory") 1)
        (func (export "run") (result i32) (i32.const 0)))"#;
    assert!(refused(other).contains("env.clock"));
    let no_memory = r#"(module (func (export "run") (result i32) (i32.const 0)))"#;
    assert!(refused(no_memory).contains("memory"));
    let bad_run = r#"(module (memory (export "memory") 1)
        (func (export "run") (param i32) (result i32) (i32.const 0)))"#;
    assert!(refused(bad_run).contains("run"));
    let bytes = b"\0asm\x01\0\0\0garbage";
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let sha: [u8; 32] = digest.as_ref().try_into().unwrap();
    assert!(matches!(
        runtime.compile(&sha, bytes),
        Err(ModuleError::Invalid(_))
    ));
    assert_eq!(
        runtime.compile(&[0; 32], bytes).err(),
        Some(ModuleError::Digest)
    );
    assert!(
        runtime.cached(&sha).is_none(),
        "nothing refused is compiled"
    );
}

#[test]
fn host_calls_move_input_output_and_memory_assets_and_charge_fuel() {
    let assets = Arc::new(MemoryAssets::new(
        NodeNumber::new(1).unwrap(),
        Locator(0xfd00_0000_0000_0001),
        1,
        (0, 1 << 20),
        (1 << 20, 1 << 30),
    ));
    let address = assets.alloc(0, &OWNER, 4096).unwrap();
    let runtime = runtime(Some(assets.clone()));
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/modules/asset_roundtrip.wat"
    ))
    .unwrap();
    let module = compile(&runtime, &text).unwrap();
    let input = [&address.octets()[..], b"bytes"].concat();
    let outcome = runtime.call(&module, OWNER, LIMITS, &input);
    assert_eq!(outcome.reason, Reason::Finished, "{outcome:?}");
    assert_eq!(outcome.status, 0);
    assert_eq!(outcome.output, b"bytes");
    assert_eq!(outcome.log, b"round trip done");
    let stored = assets
        .with(address, |shard| {
            Ok(shard.read(&OWNER, address, 0, 5)?.to_vec())
        })
        .unwrap();
    assert_eq!(stored, b"bytes");
    // Another owner's VM reaches nothing of it: the guest sees FORBIDDEN.
    let stranger = runtime.call(&module, Owner([8; 32]), LIMITS, &input);
    assert_eq!(stranger.status, abi_error::FORBIDDEN);
    // Fuel: the same call with too little stops with the fuel reason.
    let used = outcome.fuel_used;
    let short = Limits {
        fuel: used / 2,
        ..LIMITS
    };
    let starved = runtime.call(&module, OWNER, short, &input);
    assert_eq!(starved.reason, Reason::Fuel);
    assert_eq!(starved.fuel_used, used / 2);
}

#[test]
fn a_call_past_its_deadline_stops_and_the_next_one_runs() {
    let config = VmConfig {
        deadline: Duration::from_millis(20),
        ..VmConfig::default()
    };
    let runtime = Arc::new(Runtime::new(&config, 1, None).unwrap());
    let spin = compile(
        &runtime,
        r#"(module (memory (export "memory") 1)
            (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#,
    )
    .unwrap();
    let ticking = Arc::new(AtomicBool::new(true));
    let ticker = {
        let (runtime, ticking) = (runtime.clone(), ticking.clone());
        std::thread::spawn(move || {
            while ticking.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                runtime.engine().increment_epoch();
            }
        })
    };
    let unlimited = Limits {
        fuel: u64::MAX / 2,
        ..LIMITS
    };
    for _ in 0..2 {
        let outcome = runtime.call(&spin, OWNER, unlimited, &[]);
        assert_eq!(outcome.reason, Reason::Deadline, "{outcome:?}");
    }
    ticking.store(false, Ordering::Relaxed);
    ticker.join().unwrap();
}

#[test]
fn one_owner_fills_at_most_its_share_of_the_queue_and_module_bytes_are_bounded() {
    let job = |owner: Owner, module: Option<Arc<[u8]>>| VmJob {
        worker: 0,
        ticket: dataplane::control::Ticket {
            handle: 0,
            conn_id: 0,
            stream: quinn_proto::StreamId::new(quinn_proto::Side::Client, quinn_proto::Dir::Bi, 0),
        },
        kind: 0,
        owner,
        header: controlplane::vm::Header::for_module(b"", 1, 1),
        fuel_quota: 1,
        compiled: None,
        module,
        input: Vec::new(),
        check_only: false,
    };
    let mut queue = Queue::default();
    for _ in 0..QUEUED_PER_OWNER_MAX {
        queue.room(&OWNER, 0).unwrap();
        queue.jobs.push_back(job(OWNER, None));
        *queue.per_owner.entry(OWNER).or_default() += 1;
    }
    assert!(queue.room(&OWNER, 0).unwrap_err().contains("owner"));
    let other = Owner([9; 32]);
    queue.room(&other, 0).unwrap();
    assert!(queue.room(&other, QUEUED_MODULE_BYTES_MAX + 1).is_err());
    // Popping gives the owner its share back.
    queue.pop().unwrap();
    queue.room(&OWNER, 0).unwrap();
    let big: Arc<[u8]> = vec![0; 10].into();
    queue.jobs.push_back(job(other, Some(big)));
    *queue.per_owner.entry(other).or_default() += 1;
    queue.module_bytes += 10;
    while queue.pop().is_some() {}
    assert_eq!((queue.module_bytes, queue.per_owner.len()), (0, 0));
}

#[test]
fn a_refused_module_is_refused_again_without_a_compile() {
    let runtime = runtime(None);
    let text = r#"(module (import "env" "f" (func)) (memory (export "memory") 1)
        (func (export "run") (result i32) (i32.const 0)))"#;
    let first = compile(&runtime, text).err().unwrap();
    assert!(matches!(first, ModuleError::Import { .. }));
    assert_eq!(compile(&runtime, text).err(), Some(first));
    assert_eq!(lock(&runtime.modules).refused.len(), 1);
}
