static OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));
fn main() { let mut e = aya::Ebpf::load(OBJ).unwrap(); for (n, p) in e.programs_mut() { println!("{n}"); let p: &mut aya::programs::SchedClassifier = p.try_into().unwrap(); p.load().unwrap(); } }
