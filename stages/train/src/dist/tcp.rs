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
use tch::Tensor;

use super::collective::{Collective, flatten_f32, unflatten_into};

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
        if dist.world_size < 2 || dist.rank >= dist.world_size {
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
        let mut values = flatten_f32(tensors)?;
        if self.rank == 0 {
            for (i, s) in self.streams.iter().enumerate() {
                let part = self.recv(i + 1, s)?;
                if part.len() != values.len() * 4 {
                    bail!("rank {} sent {} values to sum, rank 0 has {}", i + 1, part.len() / 4, values.len());
                }
                for (acc, c) in values.iter_mut().zip(part.chunks_exact(4)) {
                    *acc += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            let bytes = f32_bytes(&values);
            for (i, s) in self.streams.iter().enumerate() {
                self.send(i + 1, s, &bytes)?;
            }
        } else {
            let s = &self.streams[0];
            self.send(0, s, &f32_bytes(&values))?;
            let sum = self.recv(0, s)?;
            if sum.len() != values.len() * 4 {
                bail!("rank 0 returned {} summed values, expected {}", sum.len() / 4, values.len());
            }
            for (v, c) in values.iter_mut().zip(sum.chunks_exact(4)) {
                *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        unflatten_into(&values, tensors)
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
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
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
