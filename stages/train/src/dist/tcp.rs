//! The CPU collective: ranks talk to rank 0 over TCP (a star). Rank 0
//! listens on a free port and writes `host port` into the rendezvous
//! directory the engine gave every rank; the others connect and introduce
//! themselves (stage key, rank, world size). Sums are taken on rank 0 in
//! rank order, so every rank gets bit-identical results, then sent back.
//! Simple rather than fast: meant for CPU tensors (tests, small models);
//! CUDA training uses NCCL.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use stage_api::DistInfo;
use stage_api::RENDEZVOUS_ABANDONED;
use stage_api::host_name;
use tch::{Kind, Tensor};

use super::collective::{Collective, check_bucket};

/// How long ranks wait for each other to show up (model loading included).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(900);
/// The file rank 0 writes into the rendezvous directory.
pub const ADDRESS_FILE: &str = "rank0.addr";
const MAGIC: &[u8; 8] = b"MRPLDP01";
const POLL: Duration = Duration::from_millis(20);

pub struct Tcp {
    rank: usize,
    world: usize,
    /// Rank 0: the streams of ranks 1.. in order; other ranks: the stream to rank 0.
    streams: Vec<TcpStream>,
}

impl Tcp {
    /// Meet the other ranks of `dist` (blocks until all are there).
    pub fn connect(dist: &DistInfo, timeout: Duration, cancelled: &dyn Fn() -> bool) -> anyhow::Result<Self> {
        // A world of one is allowed: the data-parallel code path (NCCL on
        // CUDA) run in one process, as tools/gpu_check.sh does.
        if dist.rank >= dist.world_size {
            bail!("rank {} of {} is not a data-parallel group", dist.rank, dist.world_size);
        }
        let deadline = Instant::now() + timeout;
        let streams = if dist.rank == 0 {
            Self::accept_peers(dist, deadline, cancelled)?
        } else {
            vec![Self::join(dist, deadline, cancelled)?]
        };
        for s in &streams {
            s.set_nodelay(true)?;
            s.set_read_timeout(None)?;
        }
        Ok(Self { rank: dist.rank, world: dist.world_size, streams })
    }

    fn accept_peers(
        dist: &DistInfo,
        deadline: Instant,
        cancelled: &dyn Fn() -> bool,
    ) -> anyhow::Result<Vec<TcpStream>> {
        let listener = TcpListener::bind(("0.0.0.0", 0)).context("opening a port for the other ranks")?;
        let port = listener.local_addr()?.port();
        write_atomically(&dist.rendezvous.join(ADDRESS_FILE), format!("{}\n{port}\n", host_name()).as_bytes())?;
        listener.set_nonblocking(true)?;
        let mut slots: Vec<Option<TcpStream>> = (1..dist.world_size).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, from)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                    match read_hello(&stream, dist) {
                        Ok(rank) if slots[rank - 1].is_none() => {
                            (&stream).write_all(&[1])?;
                            slots[rank - 1] = Some(stream);
                        }
                        Ok(rank) => bail!("rank {rank} connected twice (second from {from})"),
                        // A stranger (port scan, a stale rank of another run): ignore it.
                        Err(e) => tracing::warn!("ignoring a connection from {from}: {e:#}"),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let missing: Vec<usize> =
                        slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| i + 1).collect();
                    wait_a_little(deadline, cancelled, || format!("ranks {missing:?} did not connect"))?;
                }
                Err(e) => return Err(e).context("accepting a rank's connection"),
            }
        }
        Ok(slots.into_iter().flatten().collect())
    }

    fn join(dist: &DistInfo, deadline: Instant, cancelled: &dyn Fn() -> bool) -> anyhow::Result<TcpStream> {
        let file = dist.rendezvous.join(ADDRESS_FILE);
        let text = loop {
            if dist.rendezvous.join(RENDEZVOUS_ABANDONED).exists() {
                bail!("rank 0 will not run the stage (its outputs are already published)");
            }
            match std::fs::read_to_string(&file) {
                Ok(t) if t.ends_with('\n') => break t,
                _ => wait_a_little(deadline, cancelled, || format!("rank 0 did not write {}", file.display()))?,
            }
        };
        let mut lines = text.lines();
        let (host, port) = (lines.next().unwrap_or_default(), lines.next().unwrap_or_default());
        let port: u16 = port.trim().parse().with_context(|| format!("{}: bad port `{port}`", file.display()))?;
        // Same host: the loopback address always works, whatever DNS says.
        let target = if host == host_name() { "127.0.0.1".to_string() } else { host.to_string() };
        let addrs: Vec<_> = (target.as_str(), port)
            .to_socket_addrs()
            .with_context(|| format!("resolving rank 0's host `{target}`"))?
            .collect();
        let mut stream = None;
        while stream.is_none() {
            stream = addrs.iter().find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(5)).ok());
            if stream.is_none() {
                wait_a_little(deadline, cancelled, || format!("cannot connect to rank 0 at {target}:{port}"))?;
            }
        }
        let mut stream = stream.context("no connection")?;
        let mut hello = MAGIC.to_vec();
        hello.extend((dist.token.len() as u32).to_le_bytes());
        hello.extend(dist.token.as_bytes());
        hello.extend((dist.rank as u64).to_le_bytes());
        hello.extend((dist.world_size as u64).to_le_bytes());
        stream.write_all(&hello)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut ack = [0u8; 1];
        stream.read_exact(&mut ack).context("rank 0 did not accept this rank")?;
        Ok(stream)
    }

    fn lost(&self, peer: usize, e: std::io::Error) -> anyhow::Error {
        anyhow::anyhow!("rank {}: lost the connection to rank {peer} ({e}); did it fail? see its log", self.rank)
    }

    fn send(&self, to: usize, stream: &TcpStream, bytes: &[u8]) -> anyhow::Result<()> {
        let mut w = stream;
        w.write_all(&(bytes.len() as u64).to_le_bytes()).and_then(|_| w.write_all(bytes)).map_err(|e| self.lost(to, e))
    }

    fn recv(&self, from: usize, stream: &TcpStream) -> anyhow::Result<Vec<u8>> {
        let mut r = stream;
        let mut len = [0u8; 8];
        r.read_exact(&mut len).map_err(|e| self.lost(from, e))?;
        let mut buf = vec![0u8; u64::from_le_bytes(len) as usize];
        r.read_exact(&mut buf).map_err(|e| self.lost(from, e))?;
        Ok(buf)
    }
}

impl Collective for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, tensors: &[Tensor]) -> anyhow::Result<()> {
        let flat = flat_f32(tensors);
        let sum = self.sum_on_rank0(&flat)?;
        let values = if self.rank == 0 {
            let bytes = f32_bytes(&sum)?;
            for (i, s) in self.streams.iter().enumerate() {
                self.send(i + 1, s, &bytes)?;
            }
            sum
        } else {
            let sum = f32_tensor(&self.recv(0, &self.streams[0])?)?;
            if sum.numel() != flat.numel() {
                bail!("rank 0 returned {} summed values, expected {}", sum.numel(), flat.numel());
            }
            sum
        };
        copy_into(&values, tensors);
        Ok(())
    }

    fn all_gather_bytes(&mut self, bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        if self.rank == 0 {
            let mut parts = vec![bytes.to_vec()];
            for (i, s) in self.streams.iter().enumerate() {
                parts.push(self.recv(i + 1, s)?);
            }
            let mut all = (parts.len() as u64).to_le_bytes().to_vec();
            for p in &parts {
                all.extend((p.len() as u64).to_le_bytes());
                all.extend(p);
            }
            for (i, s) in self.streams.iter().enumerate() {
                self.send(i + 1, s, &all)?;
            }
            Ok(parts)
        } else {
            let s = &self.streams[0];
            self.send(0, s, bytes)?;
            decode_parts(&self.recv(0, s)?)
        }
    }

    /// Every rank sends its whole bucket to rank 0, which sums in rank order
    /// (as `all_reduce_sum`: the same bits as the replicated path) and sends
    /// each rank its chunk of the sum.
    fn reduce_scatter_sum(&mut self, input: &Tensor, output: &Tensor) -> anyhow::Result<()> {
        let n = check_bucket("reduce-scatter", self.world, output, input)? as i64;
        let sum = self.sum_on_rank0(&flat_f32(std::slice::from_ref(input)))?;
        let mine = if self.rank == 0 {
            for (i, s) in self.streams.iter().enumerate() {
                self.send(i + 1, s, &f32_bytes(&sum.narrow(0, (i as i64 + 1) * n, n))?)?;
            }
            sum.narrow(0, 0, n)
        } else {
            let chunk = f32_tensor(&self.recv(0, &self.streams[0])?)?;
            if chunk.numel() as i64 != n {
                bail!("rank 0 returned {} reduce-scattered values, expected {n}", chunk.numel());
            }
            chunk
        };
        copy_into(&mine, std::slice::from_ref(output));
        Ok(())
    }

    /// Every rank sends its chunk to rank 0, which concatenates them in rank
    /// order and sends the whole bucket back.
    fn all_gather(&mut self, input: &Tensor, output: &Tensor) -> anyhow::Result<()> {
        let n = check_bucket("all-gather", self.world, input, output)?;
        let mine = flat_f32(std::slice::from_ref(input));
        let all = if self.rank == 0 {
            let mut parts = vec![mine];
            for (i, s) in self.streams.iter().enumerate() {
                let part = f32_tensor(&self.recv(i + 1, s)?)?;
                if part.numel() != n {
                    bail!("rank {} sent {} values to all-gather, expected {n}", i + 1, part.numel());
                }
                parts.push(part);
            }
            let all = Tensor::cat(&parts, 0);
            let bytes = f32_bytes(&all)?;
            for (i, s) in self.streams.iter().enumerate() {
                self.send(i + 1, s, &bytes)?;
            }
            all
        } else {
            self.send(0, &self.streams[0], &f32_bytes(&mine)?)?;
            let all = f32_tensor(&self.recv(0, &self.streams[0])?)?;
            if all.numel() != n * self.world {
                bail!("rank 0 returned {} all-gathered values, expected {}", all.numel(), n * self.world);
            }
            all
        };
        copy_into(&all, std::slice::from_ref(output));
        Ok(())
    }
}

impl Tcp {
    /// Rank 0: `flat` plus every other rank's `flat`, added in rank order
    /// (f32; every rank's sum has the same bits). Other ranks: send `flat`
    /// to rank 0 and return it unchanged.
    fn sum_on_rank0(&self, flat: &Tensor) -> anyhow::Result<Tensor> {
        if self.rank != 0 {
            self.send(0, &self.streams[0], &f32_bytes(flat)?)?;
            return Ok(flat.shallow_clone());
        }
        let mut acc = flat.copy();
        for (i, s) in self.streams.iter().enumerate() {
            let part = f32_tensor(&self.recv(i + 1, s)?)?;
            if part.numel() != acc.numel() {
                bail!("rank {} sent {} values to sum, rank 0 has {}", i + 1, part.numel(), acc.numel());
            }
            acc += part;
        }
        Ok(acc)
    }
}

/// `tensors` flattened into one f32 CPU tensor (the wire's values).
fn flat_f32(tensors: &[Tensor]) -> Tensor {
    let flat: Vec<Tensor> =
        tensors.iter().map(|t| t.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float).reshape([-1])).collect();
    match flat.len() {
        0 => Tensor::zeros([0], (Kind::Float, tch::Device::Cpu)),
        1 => flat[0].contiguous(),
        _ => Tensor::cat(&flat, 0),
    }
}

/// The bytes of a flat f32 CPU tensor (the host's byte order: the ranks of
/// a job run on one architecture), copied in one piece.
fn f32_bytes(t: &Tensor) -> anyhow::Result<Vec<u8>> {
    let t = t.contiguous();
    let n = t.numel();
    let mut out = vec![0u8; n * 4];
    t.f_copy_data_u8(&mut out, n)?;
    Ok(out)
}

/// The flat f32 tensor of [`f32_bytes`] (a torn message: its whole values).
fn f32_tensor(bytes: &[u8]) -> anyhow::Result<Tensor> {
    let n = bytes.len() / 4;
    Ok(Tensor::f_from_data_size(&bytes[..n * 4], &[n as i64], Kind::Float)?)
}

/// Copy consecutive stretches of flat `values` into `tensors` (their kinds and devices).
fn copy_into(values: &Tensor, tensors: &[Tensor]) {
    let mut offset = 0i64;
    tch::no_grad(|| {
        for t in tensors {
            let n = t.numel() as i64;
            let src = values.narrow(0, offset, n).view(t.size().as_slice());
            t.shallow_clone().copy_(&src.to_kind(t.kind()).to_device(t.device()));
            offset += n;
        }
    });
}

/// `count, (len, bytes)*` as rank 0 sends a gather's result.
fn decode_parts(all: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut rest = all;
    let mut take = |n: usize| -> anyhow::Result<&[u8]> {
        if rest.len() < n {
            bail!("truncated gather message from rank 0");
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize;
    let count = word(take(8)?);
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        let len = word(take(8)?);
        parts.push(take(len)?.to_vec());
    }
    Ok(parts)
}

/// Check a connecting rank's introduction; returns its rank.
fn read_hello(stream: &TcpStream, dist: &DistInfo) -> anyhow::Result<usize> {
    let mut r = stream;
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        bail!("not a pipeline rank");
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 256 {
        bail!("bad introduction");
    }
    let mut token = vec![0u8; len];
    r.read_exact(&mut token)?;
    let mut words = [0u8; 16];
    r.read_exact(&mut words)?;
    let rank = u64::from_le_bytes(words[..8].try_into()?) as usize;
    let world = u64::from_le_bytes(words[8..].try_into()?) as usize;
    if token != dist.token.as_bytes() {
        bail!("a rank of another stage (key {})", String::from_utf8_lossy(&token));
    }
    if world != dist.world_size || rank == 0 || rank >= world {
        bail!("rank {rank} of {world} does not fit a group of {}", dist.world_size);
    }
    Ok(rank)
}

fn wait_a_little(deadline: Instant, cancelled: &dyn Fn() -> bool, what: impl Fn() -> String) -> anyhow::Result<()> {
    if cancelled() {
        bail!("cancelled while waiting for the other ranks");
    }
    if Instant::now() >= deadline {
        bail!("{} in time", what());
    }
    std::thread::sleep(POLL);
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::collective::{all_gather_json, all_reduce_f64};

    fn group(dir: &Path, world: usize) -> Vec<DistInfo> {
        (0..world)
            .map(|rank| DistInfo { rank, world_size: world, rendezvous: dir.to_path_buf(), token: "k".into() })
            .collect()
    }

    #[test]
    fn three_ranks_sum_and_gather_in_rank_order() {
        let dir = tempfile::tempdir().unwrap();
        let results: Vec<(Vec<f32>, Vec<String>, Vec<f64>)> = std::thread::scope(|s| {
            let handles: Vec<_> = group(dir.path(), 3)
                .into_iter()
                .map(|d| {
                    s.spawn(move || {
                        let mut c = Tcp::connect(&d, Duration::from_secs(20), &|| false).unwrap();
                        let r = d.rank as f32;
                        let (a, b) = (Tensor::from_slice(&[r, 1.0, -r]), Tensor::from_slice(&[10.0 * r]).view([1, 1]));
                        c.all_reduce_sum(&[a.shallow_clone(), b.shallow_clone()]).unwrap();
                        let mut sum = Vec::<f32>::try_from(&a).unwrap();
                        sum.extend(Vec::<f32>::try_from(&b.view([-1])).unwrap());
                        let names = all_gather_json(&mut c, &format!("rank{}", d.rank)).unwrap();
                        let counts = all_reduce_f64(&mut c, &[1.0, d.rank as f64]).unwrap();
                        (sum, names, counts)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (sum, names, counts) in results {
            assert_eq!(sum, vec![3.0, 3.0, -3.0, 30.0]);
            assert_eq!(names, vec!["rank0", "rank1", "rank2"]);
            assert_eq!(counts, vec![3.0, 3.0]);
        }
    }

    #[test]
    fn a_world_of_one_connects_and_its_collectives_are_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let d = &group(dir.path(), 1)[0];
        let mut c = Tcp::connect(d, Duration::from_secs(5), &|| false).unwrap();
        let a = Tensor::from_slice(&[1.5f32, -2.0]);
        c.all_reduce_sum(&[a.shallow_clone()]).unwrap();
        assert_eq!(Vec::<f32>::try_from(&a).unwrap(), vec![1.5, -2.0]);
        assert_eq!(all_gather_json(&mut c, &"only".to_string()).unwrap(), vec!["only".to_string()]);
        assert_eq!(all_reduce_f64(&mut c, &[3.0]).unwrap(), vec![3.0]);
    }

    #[test]
    fn a_rank_that_never_comes_or_dies_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let ranks = group(dir.path(), 2);
        let err = Tcp::connect(&ranks[0], Duration::from_millis(300), &|| false).err().unwrap();
        assert!(format!("{err:#}").contains("ranks [1] did not connect in time"), "{err:#}");

        let dir = tempfile::tempdir().unwrap();
        let ranks = group(dir.path(), 2);
        let (r0, r1) = (ranks[0].clone(), ranks[1].clone());
        let err = std::thread::scope(|s| {
            let zero = s.spawn(move || {
                let mut c = Tcp::connect(&r0, Duration::from_secs(20), &|| false).unwrap();
                c.all_gather_bytes(b"x").err()
            });
            // Rank 1 connects, then goes away without taking part.
            drop(Tcp::connect(&r1, Duration::from_secs(20), &|| false).unwrap());
            zero.join().unwrap()
        });
        let err = err.expect("rank 0 notices");
        assert!(format!("{err:#}").contains("lost the connection to rank 1"), "{err:#}");

        // Peers of a stage rank 0 gave up on leave at once.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RENDEZVOUS_ABANDONED), b"").unwrap();
        let err = Tcp::connect(&group(dir.path(), 2)[1], Duration::from_secs(20), &|| false).err().unwrap();
        assert!(format!("{err:#}").contains("will not run the stage"), "{err:#}");
    }

    #[test]
    fn strangers_and_ranks_of_another_stage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ranks = group(dir.path(), 2);
        let other = DistInfo { token: "other".into(), ..ranks[1].clone() };
        let r0 = ranks[0].clone();
        let r1 = ranks[1].clone();
        std::thread::scope(|s| {
            let zero = s.spawn(move || Tcp::connect(&r0, Duration::from_secs(20), &|| false).map(|_| ()));
            // The wrong stage's rank is ignored (and told nothing), the right one gets in.
            let wrong = Tcp::connect(&other, Duration::from_secs(3), &|| false);
            assert!(wrong.is_err());
            Tcp::connect(&r1, Duration::from_secs(20), &|| false).unwrap();
            zero.join().unwrap().unwrap();
        });
    }
}

#[cfg(test)]
mod bucket_tests {
    use super::*;
    use tch::Kind;

    /// Run `f(rank, comm)` on `world` TCP ranks (threads); results in rank order.
    fn on_ranks<T: Send>(world: usize, f: impl Fn(usize, &mut Tcp) -> T + Sync) -> Vec<T> {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = (0..world)
                .map(|rank| {
                    let d =
                        DistInfo { rank, world_size: world, rendezvous: dir.path().to_path_buf(), token: "b".into() };
                    s.spawn(move || f(rank, &mut Tcp::connect(&d, Duration::from_secs(20), &|| false).unwrap()))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn reduce_scatter_sums_in_rank_order_and_all_gather_concatenates() {
        for (world, n) in [(2, 1), (3, 5), (3, 0)] {
            // Rank r's bucket: value i·(r+1) + r/10 at position i.
            let got = on_ranks(world, |rank, c| {
                let input: Vec<f32> =
                    (0..world * n).map(|i| i as f32 * (rank + 1) as f32 + rank as f32 / 10.0).collect();
                let out = Tensor::zeros([n as i64], (Kind::Float, tch::Device::Cpu));
                c.reduce_scatter_sum(&Tensor::from_slice(&input), &out).unwrap();
                let chunk = Vec::<f32>::try_from(&out).unwrap();
                let all = Tensor::zeros([(world * n) as i64], (Kind::BFloat16, tch::Device::Cpu));
                let mine = Tensor::full([n as i64], rank as f64 + 0.5, (Kind::BFloat16, tch::Device::Cpu));
                c.all_gather(&mine, &all).unwrap();
                (chunk, Vec::<f32>::try_from(&all.to_kind(Kind::Float)).unwrap())
            });
            for (rank, (chunk, all)) in got.iter().enumerate() {
                let want: Vec<f32> = (rank * n..(rank + 1) * n)
                    .map(|i| (0..world).fold(0.0f32, |acc, r| acc + (i as f32 * (r + 1) as f32 + r as f32 / 10.0)))
                    .collect();
                assert_eq!(chunk, &want, "world {world}, rank {rank}");
                let gathered: Vec<f32> = (0..world).flat_map(|r| std::iter::repeat_n(r as f32 + 0.5, n)).collect();
                assert_eq!(all, &gathered, "world {world}, rank {rank}");
            }
        }
    }

    #[test]
    fn buckets_that_do_not_split_evenly_are_refused() {
        let errs = on_ranks(2, |_, c| {
            let out = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
            let e = c.reduce_scatter_sum(&Tensor::zeros([5], (Kind::Float, tch::Device::Cpu)), &out).unwrap_err();
            format!("{e:#}")
        });
        assert!(errs.iter().all(|e| e.contains("does not split into 2 chunks of 2")), "{errs:?}");
    }
}

#[cfg(test)]
mod grad_tests {
    use super::*;
    use crate::dist::collective::all_reduce_grads;

    #[test]
    fn gradients_are_summed_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let out: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|rank| {
                    let d = DistInfo { rank, world_size: 2, rendezvous: dir.path().to_path_buf(), token: "g".into() };
                    s.spawn(move || {
                        let mut c = Tcp::connect(&d, Duration::from_secs(20), &|| false).unwrap();
                        let p = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
                        (&p * (rank as f64 + 1.0)).sum(tch::Kind::Float).backward();
                        all_reduce_grads(&mut c, [&p].into_iter()).unwrap();
                        Vec::<f32>::try_from(&p.grad()).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(out, vec![vec![3.0, 3.0], vec![3.0, 3.0]]);
    }
}
