"""Issue 10's figures against a release binary: sockets that send nothing, clients that stop
reading, and many GETs on a stopped Redis. Everything it starts (redis-server, the simulated
upstream, the proxy) runs on 127.0.0.1 and free ports, and is stopped by pid.

usage: python3 bench/figures/hostile.py target/release/discount-proxy [--old]
(--old: a binary from before these keys existed: server.write_timeout is not set.)
"""
import concurrent.futures, http.client, json, os, signal, socket, subprocess, sys, time

BIN = sys.argv[1]
OLD = "--old" in sys.argv[2:]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def request(port, method, path, body=None, headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request(method, path, body, headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


class Lab:
    """A redis-server, a simulated upstream and one proxy with `env` on top of the defaults."""

    def __init__(self, env):
        self.redis_port, self.up_port, self.port = free_port(), free_port(), free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--save", "", "--appendonly", "no",
             "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
        self.upstream = subprocess.Popen(
            [BIN, "simulate-upstream", "--listen", f"127.0.0.1:{self.up_port}", "--latency", "50ms"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        full = dict(os.environ, RUST_LOG="warn",
                    DISCOUNT_PROXY_SERVER__LISTEN=f"127.0.0.1:{self.port}",
                    DISCOUNT_PROXY_REDIS__URL=f"redis://127.0.0.1:{self.redis_port}/0",
                    DISCOUNT_PROXY_UPSTREAM__URL=f"http://127.0.0.1:{self.up_port}/contract/?sn={{sn}}")
        full.update({key: value for key, value in env.items()
                     if not (OLD and key.endswith("WRITE_TIMEOUT"))})
        self.proxy = None
        try:
            wait_port(self.redis_port)
            wait_port(self.up_port)
            self.proxy = subprocess.Popen([BIN, "serve"], env=full,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_port(self.port)
        except BaseException:
            # A proxy that would not start (a key it does not know): stop what was started.
            self.stop()
            raise

    def seed(self, sn, discount):
        """An entry in the proxy's format, fetched now, read from stdin (`-x`): values of
        hundreds of kB do not fit on a command line."""
        millis = int(time.time() * 1000)
        value = f"dp1+{millis:013d} {json.dumps(discount)}".encode()
        subprocess.run(["redis-cli", "-p", str(self.redis_port), "-x", "SET", f"discount:v1:{sn}"],
                       input=value, check=True, stdout=subprocess.DEVNULL)

    def stop(self):
        for process in (self.proxy, self.upstream, self.redis):
            if process is None or process.poll() is not None:
                continue
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
            process.wait()


def idle_sockets():
    """2,000 sockets (half send nothing, half half the HTTP/2 preface); the loopback here
    takes a few seconds to set up that many, so the count is read after the last one."""
    lab = Lab({"DISCOUNT_PROXY_SERVER__HEADER_READ_TIMEOUT": "10s"})
    try:
        base = fds(lab.proxy.pid)
        sockets = [socket.create_connection(("127.0.0.1", lab.port)) for _ in range(1000)]
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", lab.port))
            s.sendall(b"PRI * HTTP/2.0\r\n")
            sockets.append(s)
        time.sleep(0.2)
        started = time.time()
        status, _ = request(lab.port, "GET", "/healthz")
        served = time.time() - started
        after_last = fds(lab.proxy.pid) - base
        time.sleep(11)
        later = fds(lab.proxy.pid) - base
        print(f"2,000 sockets sending nothing or half an HTTP/2 preface, header_read_timeout 10s: "
              f"proxy's extra fds 0.2 s after the last {after_last}, 11 s later {max(later, 0)}; "
              f"/healthz {status} in {served * 1000:.1f} ms")
        for s in sockets:
            s.close()
    finally:
        lab.stop()


def stuck_reader(port, sns, accept):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    body = json.dumps({"sns": sns}).encode()
    s.sendall(b"POST /v1/discounts/lookup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Accept: {accept}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def stuck_readers(accepts):
    lab = Lab({"DISCOUNT_PROXY_SERVER__MAX_IN_FLIGHT": "2",
               "DISCOUNT_PROXY_SERVER__WRITE_TIMEOUT": "2s"})
    try:
        blob = "x" * 200_000
        sns = [f"BIG-{i}" for i in range(50)]
        for sn in sns:
            lab.seed(sn, {"blob": blob})
        started = time.time()
        stuck = [stuck_reader(lab.port, sns, accept) for accept in accepts]
        time.sleep(0.3)
        refused = 0
        while time.time() - started < 10:
            status, _ = request(lab.port, "GET", "/v1/discounts/BIG-0")
            if status == 200:
                print(f"max_in_flight 2, two clients that never read 10 MB responses ({' + '.join(accepts)}), write_timeout 2s: "
                      f"a third client served after {time.time() - started:.2f} s ({refused} × 503 before)")
                break
            refused += 1
            time.sleep(0.05)
        else:
            print(f"max_in_flight 2, two stuck readers ({' + '.join(accepts)}): a third client was not served within 10 s ({refused} × 503)")
        for s in stuck:
            s.close()
    finally:
        lab.stop()


def stopped_redis(breaker_failures):
    lab = Lab({"DISCOUNT_PROXY_REDIS__BREAKER_FAILURES": str(breaker_failures)})
    try:
        sns = [f"C-{i}" for i in range(200)]
        for sn in sns:
            lab.seed(sn, {"rate": 0.1})
        os.kill(lab.redis.pid, signal.SIGSTOP)

        def get(sn):
            started = time.time()
            status, _ = request(lab.port, "GET", f"/v1/discounts/{sn}")
            return status, time.time() - started

        with concurrent.futures.ThreadPoolExecutor(200) as pool:
            answers = list(pool.map(get, sns))
        statuses = sorted({status for status, _ in answers})
        slowest = max(took for _, took in answers)
        print(f"200 concurrent GETs of cached SNs, Redis stopped, breaker_failures {breaker_failures}: "
              f"statuses {statuses}, slowest {slowest:.3f} s")
    finally:
        lab.stop()


idle_sockets()
stuck_readers(["application/json", "application/x-ndjson"])
stuck_readers(["application/x-ndjson", "application/x-ndjson"])
stopped_redis(3)
stopped_redis(0)
