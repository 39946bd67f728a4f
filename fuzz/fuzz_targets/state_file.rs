#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vxmesh_lab::fuzzing::state_file(data));
