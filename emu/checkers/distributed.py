"""Campaign and PCT runs on a Ray cluster (``--ray ADDRESS``), with the results of a local run.

Run i is a pure function of the seed and i (its plans, its schedule seed), so where it runs does
not matter: the driver cuts the run arguments into batches, Ray workers run them, and the driver
takes the results back in run order, exactly as ``in_children`` does on one machine.

    cluster = Cluster.connect("local")       # or "auto", "HOST:PORT", "ray://HOST:PORT"
    results = cluster.map(spec, items, total, elf=path, machine=kwargs)    # an ordered iterator
    cluster.close()

``spec`` says what a worker runs: ``spec.setup(factory)`` builds the worker's runner once from
its snapshot (``factory()`` builds the Machine), ``runner(item)`` gives one run's result in a
forked child, ``spec.on_error(exc)`` the result of a run that raised.  Ray is an optional extra
(``pip install 'emu[ray]'``): nothing here imports it until a cluster is asked for.
"""

import heapq
import os
import signal
import socket
import tempfile
import time

INSTALL_HINT = "pip install 'emu[ray]'"
CONNECT_TIMEOUT = 3.0  # seconds: an address with no cluster behind it fails this fast
IN_FLIGHT = 2  # batches queued per worker, so a worker never waits for the driver
MAX_BATCH = 64  # runs per batch: ~0.3 s of PCT runs, ~1.5 s of campaign runs
MAX_ATTEMPTS = 3  # a batch that kills this many workers is a bug, not bad luck


class ClusterError(Exception):
    """Bad --ray input or a cluster that cannot run the job: one line for the user."""


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--ray needs Ray, an optional extra: {INSTALL_HINT}") from None
    return ray


def _host_port(address):
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"--ray {address!r}: use local, auto, HOST:PORT or ray://HOST:PORT")
    return host.strip("[]"), int(port)


# The RPC a Ray endpoint answers (with a token-authenticated cluster: UNAUTHENTICATED): the
# GCS at HOST:PORT, the Ray Client server at ray://HOST:PORT.
_PROBE_RPC = {False: "/ray.rpc.NodeInfoGcsService/GetClusterId", True: "/ray.rpc.RayletDriver/ClusterInfo"}


def _probe(address, host, port, client):
    # ray.init() retries an endpoint with no Ray behind it for 20 s (the GCS) to minutes (Ray
    # Client), spamming stderr; one RPC with a deadline tells in CONNECT_TIMEOUT.  A plain TCP
    # connect is not enough: a proxy, or another service, may accept any connection.
    def nobody(why):
        return ClusterError(f"--ray {address}: no Ray cluster there ({why}; start one with `ray start --head`)")

    try:
        import grpc
    except ImportError:  # Ray without its client extra: TCP is all we can try
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
        except OSError as e:
            raise nobody(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
        return
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        call = channel.unary_unary(
            _PROBE_RPC[client], request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        call(b"", timeout=CONNECT_TIMEOUT)
    except grpc.RpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise nobody(f"cannot connect to {host}:{port}") from None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise nobody(f"{host}:{port} answers, but not as Ray's {'client server' if client else 'GCS'}") from None
        if code == grpc.StatusCode.UNAUTHENTICATED and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            # Ray 2.60 sends its token only when told to, and otherwise retries for 20 s.
            raise ClusterError(
                f"--ray {address}: the cluster wants Ray's auth token: set RAY_AUTH_MODE=token "
                f"(the token from `ray get-auth-token` in ~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from None
        # Anything else (an error about the empty request) is Ray answering.
    finally:
        channel.close()


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _Worker:
    """A Ray actor: the snapshot is built once, then batches of runs fork from it."""

    def __init__(self, spec, elf_name, elf_bytes, machine, kill_batch=None):
        self.kill_batch = kill_batch
        self.error = None
        try:
            # Ctrl-C on a terminal reaches a --ray local runtime's workers too; a worker that took
            # it would fail its batch.  The driver stops the workers itself, keeping their results.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # (only the main thread may; sync actors run there)
            pass
        try:
            from ..userspace.vmm import Machine

            # The guest travels with the job: a worker needs no checkout, and runs exactly the
            # driver's build of it.  The image is loaded at build time, so the file can go.
            d = tempfile.mkdtemp(prefix="emu-ray-")
            path = os.path.join(d, elf_name)
            with open(path, "wb") as f:
                f.write(elf_bytes)
            try:
                self.run = spec.setup(lambda: Machine(path, **machine))
            finally:
                os.unlink(path)
                os.rmdir(d)
            self.on_error = spec.on_error
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"

    def run_batch(self, batch_no, attempt, items):
        from .explore import in_child

        if self.error is not None:
            return ("init_error", self.error)
        if batch_no == self.kill_batch and attempt == 0:
            os._exit(1)  # the tests' dying worker (a hidden option)
        return ("ok", [in_child(lambda item=item: self.run(item), self.on_error) for item in items])


class Cluster:
    def __init__(self, ray, address):
        self.ray = ray
        self.address = address
        self.workers = 0  # live workers, for the progress line
        self.peak_workers = 0
        self.rerun_batches = 0
        self.kill_batch = None  # the tests' hook: the first try of this batch kills its worker
        self._actors = []
        self._worker_cls = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(_Worker)

    @classmethod
    def connect(cls, address):
        client = address.startswith("ray://")
        if address not in ("local", "auto"):
            host, port = _host_port(address[len("ray://") :] if client else address)
        ray = _import_ray()
        if address not in ("local", "auto"):
            _probe(address, host, port, client)
        import logging
        import emu
        import tdxmod

        # Ship the driver's own emu to the workers: a worker that imported another version of the
        # model would give other results.  The nodes need only the dependencies installed.
        # (Paths, not the modules: Ray Client pickles the runtime env.)
        env = {"py_modules": [os.path.dirname(m.__file__) for m in (emu, tdxmod)]}
        opts = dict(runtime_env=env, logging_level=logging.ERROR, log_to_driver=False)
        try:
            if address == "local":
                # "local" to Ray too: without it, ray.init() joins a cluster already on this machine.
                ray.init(
                    address="local",
                    num_cpus=os.cpu_count() or 1,
                    include_dashboard=False,
                    object_store_memory=128 << 20,
                    **opts,
                )
            else:
                ray.init(address=address, **opts)
        except Exception as e:
            if ray.is_initialized():
                ray.shutdown()
            hint = " (Ray Client needs `pip install 'ray[client]'`)" if "ray[client]" in str(e) else ""
            raise ClusterError(f"--ray {address}: cannot connect: {_first_line(e)}{hint}") from None
        # Ray prints a dead worker's notice on the driver's stdout even with log_to_driver off,
        # into --json output; the result reports it (rerun_batches) instead.
        import ray._private.worker as rw

        if hasattr(rw, "_worker_logs_enabled"):
            rw._worker_logs_enabled = False
        return cls(ray, address)

    def cpus(self):
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def close(self):
        self._kill_all()
        self.ray.shutdown()  # a --ray local runtime stops; a cluster is only left

    def _kill_all(self):
        for a in self._actors:
            try:
                self.ray.kill(a)
            except Exception:
                pass
        self._actors = []
        self.workers = 0

    def stats(self):
        """For the JSON result: where it ran, and whether a worker's batch had to run again."""
        return {"address": self.address, "workers": self.peak_workers, "rerun_batches": self.rerun_batches}

    # -- the job ------------------------------------------------------------------------------------
    def map(self, spec, items, total, elf, machine, stall=None):
        """The results of ``items`` (run arguments, in run order), in that order.  Stop iterating
        to stop the job.  On Ctrl-C, the results already back are given (in order, up to gaps
        where a batch was still running), then KeyboardInterrupt is raised again.  A worker that
        spends more than ``stall`` seconds per run over a batch has stopped answering: it is
        killed, the batch's runs are ``spec.on_error(Stalled)`` (hangs), and the batches queued
        behind it run elsewhere."""
        from ray.exceptions import RayActorError, RayTaskError
        from .forktree import Stalled

        ray = self.ray
        n = self.cpus()
        size = max(1, min(MAX_BATCH, -(-total // (n * 8))))
        with open(elf, "rb") as f:
            job = (spec, os.path.basename(str(elf)), ray.put(f.read()), machine, self.kill_batch)
        self._actors = [self._worker_cls.remote(*job) for _ in range(n)]
        self.workers = self.peak_workers = n
        load = {a: 0 for a in self._actors}
        items = iter(items)
        fresh = 0  # the next batch number to cut from items
        exhausted = False
        again = []  # heap: batches whose worker died, (batch, attempt, items)
        pending = {}  # ref -> (batch, attempt, items, actor)
        done = {}  # batch -> results
        out = 0  # the next batch to give back
        since = {}  # actor -> when the batch it runs now began

        def next_batch():
            nonlocal fresh, exhausted
            if again:
                return heapq.heappop(again)
            if exhausted:
                return None
            chunk = []
            for item in items:
                chunk.append(item)
                if len(chunk) == size:
                    break
            if not chunk:
                exhausted = True
                return None
            fresh += 1
            return (fresh - 1, 0, chunk)

        try:
            while True:
                for a in list(load):
                    while load[a] < IN_FLIGHT:
                        b = next_batch()
                        if b is None:
                            break
                        if load[a] == 0:
                            since[a] = time.monotonic()
                        pending[a.run_batch.remote(*b)] = (*b, a)
                        load[a] += 1
                while out in done:
                    yield from done.pop(out)
                    out += 1
                if not pending:
                    if again:
                        raise ClusterError("every Ray worker died")
                    return
                wait = None
                if stall is not None:
                    busy = [since[a] for a in load if load[a]]
                    wait = max(0.0, min(busy) + stall * size - time.monotonic()) if busy else None
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait)
                if not ready and wait is not None:
                    now = time.monotonic()
                    for a in [a for a in load if load[a] and now - since[a] >= stall * size]:
                        # Stopped answering: the batch it runs is reported, the ones behind it go
                        # elsewhere, and a fresh worker takes its place.
                        mine = sorted((v[0], v[1], v[2], ref) for ref, v in pending.items() if v[3] is a)
                        for k, (batch, attempt, chunk, ref) in enumerate(mine):
                            del pending[ref]
                            if k == 0:
                                err = Stalled(
                                    f"the run's Ray worker stopped answering (killed after {stall * size:.0f} s)"
                                )
                                done[batch] = [spec.on_error(err) for _ in chunk]
                            else:
                                heapq.heappush(again, (batch, attempt, chunk))
                        del load[a]
                        self._actors.remove(a)
                        try:
                            ray.kill(a)
                        except Exception:
                            pass
                        new = self._worker_cls.remote(*job)
                        self._actors.append(new)
                        load[new] = 0
                    continue
                for ref in ready:
                    batch, attempt, chunk, a = pending.pop(ref)
                    if a in load:
                        load[a] -= 1
                        since[a] = time.monotonic()
                    try:
                        kind, value = ray.get(ref)
                    except RayActorError as e:
                        # The worker died (its node went away, it was killed): only this batch is
                        # lost; it runs again elsewhere, and run i gives the same result anywhere.
                        if attempt + 1 >= MAX_ATTEMPTS:
                            raise ClusterError(
                                f"batch {batch} killed {MAX_ATTEMPTS} Ray workers: {_first_line(e)}"
                            ) from None
                        heapq.heappush(again, (batch, attempt + 1, chunk))
                        self.rerun_batches += 1
                        if a in load:
                            del load[a]
                            self._actors.remove(a)
                            try:
                                ray.kill(a)  # (if only unreachable, it must not come back)
                            except Exception:
                                pass
                            new = self._worker_cls.remote(*job)
                            self._actors.append(new)
                            load[new] = 0
                        continue
                    except RayTaskError as e:
                        raise ClusterError(f"a Ray worker failed: {_first_line(e)}") from None
                    if kind == "init_error":
                        raise ClusterError(f"a Ray worker cannot build the machine: {value}")
                    done[batch] = value
                self.workers = len(load)
        except KeyboardInterrupt:
            self._kill_all()
            # Keep what was found: every batch already back, in run order.
            for b in sorted(done):
                yield from done[b]
            raise
        finally:
            self._kill_all()
