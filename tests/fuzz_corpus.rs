//! Replays the fuzz corpus (`fuzz/corpus/TARGET/`) and every input that once
//! crashed a target (`fuzz/regressions/TARGET/`) through the same library
//! functions the cargo-fuzz targets call, so fixed crashes stay fixed on
//! stable. Fuzzing itself: `scripts/fuzz.sh`.

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("cluster_toml", vxmesh_lab::fuzzing::cluster_toml),
    ("cni_config", vxmesh_lab::fuzzing::cni_config),
    ("cni_env", vxmesh_lab::fuzzing::cni_env),
    ("store_record", vxmesh_lab::fuzzing::store_record),
    ("state_file", vxmesh_lab::fuzzing::state_file),
    ("saved_plan", vxmesh_lab::fuzzing::saved_plan),
];

fn replay(kind: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join("fuzz")
        .join(kind);
    let mut n = 0;
    for (target, run) in TARGETS {
        let dir = root.join(target);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        for f in files.iter().filter(|f| f.is_file()) {
            let data = std::fs::read(f).unwrap();
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(r.is_ok(), "{target} panics on {}", f.display());
            n += 1;
        }
    }
    n
}

#[test]
fn corpus_replays_without_panics() {
    let n = replay("corpus");
    assert!(n >= 6, "the fuzz corpus is missing ({n} files)");
}

#[test]
fn regressions_stay_fixed() {
    // An empty or missing directory would make this pass without replaying
    // anything: the kept crashes must be there.
    let n = replay("regressions");
    assert!(n >= 2, "the fuzz regressions are missing ({n} files)");
}

#[test]
fn every_target_has_a_corpus() {
    for (target, _) in TARGETS {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join("fuzz/corpus")
            .join(target);
        let n = std::fs::read_dir(&dir).map(|rd| rd.count()).unwrap_or(0);
        assert!(n > 0, "no corpus for {target} in {}", dir.display());
    }
}
