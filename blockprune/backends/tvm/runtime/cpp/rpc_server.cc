// blockprune minimal TVM RPC server: the handshake of tvm/rpc/server.py, then the runtime's
// "rpc.ServerLoop" on the accepted socket.
//
// Why our own: the board (or qemu-aarch64 here) has no Python TVM, only the runtime libraries
// of the PyPI wheels; like bp_runner.cc it uses only tvm-ffi headers. The host drives it with
// tvm.rpc.connect -> upload -> load_module -> Relax VM / time_evaluator (rpc.bench_rpc).
//
// Bounded on purpose: it listens on 127.0.0.1 unless --host says otherwise (on a board:
// --host 0.0.0.0 or the board's address), serves at most --max-sessions sessions one
// after the other, and exits after --timeout seconds whatever it is doing.
//
// usage: bp_rpc_server [--host ADDR] [--port P] [--key K] [--max-sessions N] [--timeout S] [--work-dir DIR]
//   --port 0 (default) picks a free port. The first line on stdout is always
//   "bp_rpc_server listening on <host>:<port>" (flushed), for launchers to parse.
//   Exit status: 0 after N sessions, 3 on timeout, 1 on a setup error, 2 on bad usage.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>
#include <thread>

namespace ffi = tvm::ffi;
namespace fs = std::filesystem;

namespace {

// python/tvm/rpc/base.py
constexpr int32_t kRPCMagic = 0xFF271;
constexpr int32_t kRPCCodeSuccess = kRPCMagic + 0;
constexpr int32_t kRPCCodeMismatch = kRPCMagic + 2;
constexpr int32_t kMaxKeyLen = 4096;

std::string g_session_dir;  // current session's work directory (uploads land here)

bool SendAll(int fd, const void* buf, size_t n) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool RecvAll(int fd, void* buf, size_t n) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t k = ::recv(fd, p, n, 0);
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

void SetRecvTimeout(int fd, int seconds) {
  timeval tv{};
  tv.tv_sec = seconds;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

// A path inside the session directory; refuses names that would escape it.
std::string WorkPath(const std::string& name) {
  if (g_session_dir.empty()) throw std::runtime_error("no RPC session is active");
  fs::path rel(name);
  if (rel.is_absolute()) throw std::runtime_error("absolute remote path refused: " + name);
  for (const auto& part : rel) {
    if (part == "..") throw std::runtime_error("remote path outside the work directory refused: " + name);
  }
  return (fs::path(g_session_dir) / rel).string();
}

// What python/tvm/rpc/server.py's _server_env registers, minus linking of .o/.tar uploads.
void RegisterServerEnv() {
  ffi::Function::SetGlobal(
      "tvm.rpc.server.workpath",
      ffi::Function::FromTyped([](ffi::String name) -> ffi::String { return WorkPath(std::string(name)); }),
      /*can_override=*/true);
  ffi::Function::SetGlobal(
      "tvm.rpc.server.load_module",
      ffi::Function::FromTyped([](ffi::String name) -> ffi::Module {
        std::string path = WorkPath(std::string(name));
        std::cerr << "bp_rpc_server: load_module " << path << std::endl;
        return ffi::Module::LoadFromFile(path);
      }),
      /*can_override=*/true);
}

// Server side of the handshake. Returns true when the session may start.
bool Handshake(int fd, const std::string& key, std::string* opts) {
  int32_t magic = 0, keylen = 0;
  if (!RecvAll(fd, &magic, 4) || magic != kRPCMagic) return false;
  if (!RecvAll(fd, &keylen, 4) || keylen < 0 || keylen > kMaxKeyLen) return false;
  std::string client_key(static_cast<size_t>(keylen), '\0');
  if (keylen > 0 && !RecvAll(fd, &client_key[0], keylen)) return false;
  // "client:<key> [-timeout=S]"
  size_t sp = client_key.find(' ');
  std::string head = client_key.substr(0, sp);
  *opts = sp == std::string::npos ? "" : client_key.substr(sp + 1);
  if (head != "client:" + key) {
    int32_t code = kRPCCodeMismatch;
    SendAll(fd, &code, 4);
    std::cerr << "bp_rpc_server: key mismatch (got '" << head << "')" << std::endl;
    return false;
  }
  std::string server_key = "server:" + key;
  int32_t code = kRPCCodeSuccess, len = static_cast<int32_t>(server_key.size());
  return SendAll(fd, &code, 4) && SendAll(fd, &len, 4) && SendAll(fd, server_key.data(), server_key.size());
}

[[noreturn]] void Usage(const char* argv0) {
  std::cerr << "usage: " << argv0
            << " [--host ADDR] [--port P] [--key K] [--max-sessions N] [--timeout SECONDS] [--work-dir DIR]\n";
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  int port = 0, max_sessions = 1;
  double timeout = 600;
  std::string key, work_root, host = "127.0.0.1";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (i + 1 >= argc) Usage(argv[0]);
    std::string v = argv[++i];
    try {
      if (a == "--port") port = std::stoi(v);
      else if (a == "--host") host = v;
      else if (a == "--key") key = v;
      else if (a == "--max-sessions") max_sessions = std::stoi(v);
      else if (a == "--timeout") timeout = std::stod(v);
      else if (a == "--work-dir") work_root = v;
      else Usage(argv[0]);
    } catch (const std::exception&) {
      Usage(argv[0]);
    }
  }
  if (port < 0 || port > 65535 || max_sessions < 1 || !(timeout > 0)) Usage(argv[0]);
  signal(SIGPIPE, SIG_IGN);

  // Hard bound on the whole process, also while a session is inside ServerLoop.
  std::thread([timeout] {
    std::this_thread::sleep_for(std::chrono::duration<double>(timeout));
    std::cerr << "bp_rpc_server: timeout after " << timeout << " s, exiting" << std::endl;
    std::_Exit(3);
  }).detach();

  std::optional<ffi::Function> server_loop = ffi::Function::GetGlobal("rpc.ServerLoop");
  if (!server_loop.has_value()) {
    std::cerr << "bp_rpc_server: the TVM runtime has no rpc.ServerLoop (built without RPC?)" << std::endl;
    return 1;
  }
  RegisterServerEnv();

  if (work_root.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    work_root = tmp && *tmp ? tmp : "/tmp";
  }

  int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (lfd < 0) {
    std::perror("bp_rpc_server: socket");
    return 1;
  }
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    std::cerr << "bp_rpc_server: --host " << host << " is not an IPv4 address" << std::endl;
    return 1;
  }
  if (::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(lfd, 4) != 0) {
    std::perror(("bp_rpc_server: bind/listen on " + host).c_str());
    return 1;
  }
  socklen_t alen = sizeof(addr);
  getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &alen);
  std::cout << "bp_rpc_server listening on " << host << ":" << ntohs(addr.sin_port) << std::endl;

  int served = 0;
  while (served < max_sessions) {
    int cfd = ::accept(lfd, nullptr, nullptr);
    if (cfd < 0) {
      if (errno == EINTR) continue;
      std::perror("bp_rpc_server: accept");
      return 1;
    }
    SetRecvTimeout(cfd, 10);  // a peer that connects and says nothing must not hang us
    std::string opts;
    if (!Handshake(cfd, key, &opts)) {
      ::close(cfd);
      continue;  // not a TVM client, or a wrong key: does not count as a session
    }
    SetRecvTimeout(cfd, 0);  // ServerLoop blocks in recv between client requests
    ++served;

    std::string tmpl = (fs::path(work_root) / "bp-rpc-XXXXXX").string();
    if (::mkdtemp(&tmpl[0]) == nullptr) {
      std::perror("bp_rpc_server: mkdtemp");
      ::close(cfd);
      return 1;
    }
    g_session_dir = tmpl;
    std::cerr << "bp_rpc_server: session " << served << " in " << g_session_dir
              << (opts.empty() ? "" : " (" + opts + ")") << std::endl;
    int rc = 0;
    try {
      (*server_loop)(static_cast<int64_t>(cfd));
    } catch (const std::exception& e) {
      // The client went away mid-call, or a request failed in a way ServerLoop re-raises.
      std::cerr << "bp_rpc_server: session " << served << " ended with an error: " << e.what() << std::endl;
      rc = 1;
    }
    ::close(cfd);
    std::error_code ec;
    fs::remove_all(g_session_dir, ec);
    g_session_dir.clear();
    std::cerr << "bp_rpc_server: session " << served << " finished" << (rc ? " (error)" : "") << std::endl;
  }
  ::close(lfd);
  return 0;
}
