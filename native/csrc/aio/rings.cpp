// The two kernel queue interfaces behind the Ring class: io_uring (liburing,
// compiled when CMake found it) and Linux kernel AIO (io_setup / io_submit /
// io_getevents, the interface libaio wraps, called directly so no library is
// needed), plus the run-time probe of both.
#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "aio/engine.h"

#if defined(__linux__)
#include <linux/aio_abi.h>
#include <sys/syscall.h>
#include <unistd.h>
#define DS_AIO_HAVE_KAIO 1
#endif

#if defined(DS_AIO_HAVE_URING)
#include <liburing.h>
#endif

namespace ds_aio {

#if defined(DS_AIO_HAVE_URING)
namespace {

class URing final : public Ring {
 public:
  explicit URing(int qd) : qd_(qd) {}
  ~URing() override {
    if (ok_) io_uring_queue_exit(&ring_);
  }
  int init() {
    // The completion queue is twice the submission queue (liburing's default),
    // and we never have more than queue_depth operations out, so it cannot overflow.
    const int rc = io_uring_queue_init(static_cast<unsigned>(qd_), &ring_, 0);
    ok_ = rc == 0;
    return rc;
  }
  void prep(int slot, int fd, void* buf, size_t len, int64_t off, bool read) override {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);  // never null: at most qd prepared
    if (read) {
      io_uring_prep_read(sqe, fd, buf, static_cast<unsigned>(len), static_cast<__u64>(off));
    } else {
      io_uring_prep_write(sqe, fd, buf, static_cast<unsigned>(len), static_cast<__u64>(off));
    }
    io_uring_sqe_set_data64(sqe, static_cast<__u64>(slot));
    prepared_.push_back(slot);
  }
  int submit(std::vector<std::pair<int, int64_t>>& rejected) override {
    size_t taken = 0;
    int tries = 0;
    while (taken < prepared_.size()) {
      const int rc = io_uring_submit(&ring_);
      if (rc > 0) {
        taken += static_cast<size_t>(rc);
        continue;
      }
      if ((rc == -EINTR || rc == -EAGAIN || rc == -EBUSY || rc == 0) && ++tries < 1000) {
        usleep(50);
        continue;
      }
      // The kernel will not take the rest. They stay unconsumed in the queue, so this
      // ring must never submit again; the engine runs them (and all later blocks) itself.
      for (size_t i = taken; i < prepared_.size(); ++i) rejected.emplace_back(prepared_[i], -EAGAIN);
      prepared_.clear();
      return rc < 0 ? rc : -EAGAIN;
    }
    prepared_.clear();
    return 0;
  }
  int reap(int min_complete, std::vector<std::pair<int, int64_t>>& out) override {
    io_uring_cqe* cqe = nullptr;
    const int rc = io_uring_wait_cqe_nr(&ring_, &cqe, static_cast<unsigned>(min_complete));
    if (rc < 0) return rc;
    unsigned head;
    unsigned n = 0;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      out.emplace_back(static_cast<int>(io_uring_cqe_get_data64(cqe)), static_cast<int64_t>(cqe->res));
      ++n;
    }
    io_uring_cq_advance(&ring_, n);
    return 0;
  }

 private:
  int qd_;
  bool ok_ = false;
  io_uring ring_{};
  std::vector<int> prepared_;
};

}  // namespace

std::unique_ptr<Ring> make_uring(int queue_depth, int* err) {
  auto r = std::make_unique<URing>(queue_depth);
  const int rc = r->init();
  if (rc != 0) {
    *err = -rc;
    return nullptr;
  }
  return r;
}

// Creates a ring and runs one no-op through it: containers may allow the setup
// call and forbid io_uring_enter (seccomp), and kernels may disable io_uring.
static int uring_selftest() {
  io_uring ring{};
  int rc = io_uring_queue_init(2, &ring, 0);
  if (rc < 0) return -rc;
  io_uring_sqe* sqe = io_uring_get_sqe(&ring);
  io_uring_prep_nop(sqe);
  rc = io_uring_submit(&ring);
  if (rc == 1) {
    io_uring_cqe* cqe = nullptr;
    rc = io_uring_wait_cqe(&ring, &cqe);
    if (rc == 0) {
      rc = cqe->res;
      io_uring_cqe_seen(&ring, cqe);
    }
  } else if (rc >= 0) {
    rc = -EIO;
  }
  io_uring_queue_exit(&ring);
  return rc < 0 ? -rc : 0;
}
#else
std::unique_ptr<Ring> make_uring(int, int* err) {
  *err = ENOSYS;
  return nullptr;
}
#endif

#if defined(DS_AIO_HAVE_KAIO)
namespace {

long sys_io_setup(unsigned nr, aio_context_t* ctx) { return syscall(SYS_io_setup, nr, ctx); }
long sys_io_destroy(aio_context_t ctx) { return syscall(SYS_io_destroy, ctx); }
long sys_io_submit(aio_context_t ctx, long n, iocb** cbs) { return syscall(SYS_io_submit, ctx, n, cbs); }
long sys_io_getevents(aio_context_t ctx, long min_nr, long nr, io_event* ev) {
  return syscall(SYS_io_getevents, ctx, min_nr, nr, ev, nullptr);
}

class KAio final : public Ring {
 public:
  explicit KAio(int qd) : qd_(qd), cbs_(static_cast<size_t>(qd)), events_(static_cast<size_t>(qd)) {}
  ~KAio() override {
    if (ok_) sys_io_destroy(ctx_);
  }
  int init() {
    if (sys_io_setup(static_cast<unsigned>(qd_), &ctx_) != 0) return errno;
    ok_ = true;
    return 0;
  }
  void prep(int slot, int fd, void* buf, size_t len, int64_t off, bool read) override {
    iocb& cb = cbs_[static_cast<size_t>(slot)];
    memset(&cb, 0, sizeof(cb));
    cb.aio_data = static_cast<__u64>(slot);
    cb.aio_lio_opcode = read ? IOCB_CMD_PREAD : IOCB_CMD_PWRITE;
    cb.aio_fildes = static_cast<__u32>(fd);
    cb.aio_buf = reinterpret_cast<__u64>(buf);
    cb.aio_nbytes = static_cast<__u64>(len);
    cb.aio_offset = off;
    prepared_.push_back(&cb);
  }
  int submit(std::vector<std::pair<int, int64_t>>& rejected) override {
    size_t i = 0;
    int tries = 0;
    while (i < prepared_.size()) {
      const long rc = sys_io_submit(ctx_, static_cast<long>(prepared_.size() - i), prepared_.data() + i);
      if (rc > 0) {
        i += static_cast<size_t>(rc);
        continue;
      }
      const int err = rc == 0 ? EAGAIN : errno;
      if ((err == EINTR || err == EAGAIN) && ++tries < 1000) {
        usleep(50);
        continue;
      }
      // io_submit names the first operation it refused; the engine runs that one itself.
      rejected.emplace_back(static_cast<int>(prepared_[i]->aio_data), -static_cast<int64_t>(err));
      ++i;
    }
    prepared_.clear();
    return 0;
  }
  int reap(int min_complete, std::vector<std::pair<int, int64_t>>& out) override {
    const long n = sys_io_getevents(ctx_, min_complete, qd_, events_.data());
    if (n < 0) return -errno;
    for (long k = 0; k < n; ++k) {
      out.emplace_back(static_cast<int>(events_[static_cast<size_t>(k)].data),
                       static_cast<int64_t>(events_[static_cast<size_t>(k)].res));
    }
    return 0;
  }

 private:
  int qd_;
  bool ok_ = false;
  aio_context_t ctx_ = 0;
  std::vector<iocb> cbs_;
  std::vector<io_event> events_;
  std::vector<iocb*> prepared_;
};

}  // namespace

std::unique_ptr<Ring> make_kaio(int queue_depth, int* err) {
  auto r = std::make_unique<KAio>(queue_depth);
  const int rc = r->init();
  if (rc != 0) {
    *err = rc;
    return nullptr;
  }
  return r;
}
#else
std::unique_ptr<Ring> make_kaio(int, int* err) {
  *err = ENOSYS;
  return nullptr;
}
#endif

namespace {

std::string why(int err, const char* what) {
  std::string s = std::string(what) + " failed: " + strerror(err);
  if (err == EPERM) s += " (disabled by the kernel, e.g. sysctl kernel.io_uring_disabled, or by a seccomp profile)";
  if (err == ENOSYS) s += " (not in this kernel, or filtered by a seccomp profile)";
  if (err == EAGAIN) s += " (fs.aio-max-nr reached)";
  return s;
}

}  // namespace

std::vector<Probe> probe_backends() {
  std::vector<Probe> out;
  Probe u{"io_uring", false, false, ""};
#if defined(DS_AIO_HAVE_URING)
  u.compiled = true;
  const int ue = uring_selftest();
  u.usable = ue == 0;
  if (ue != 0) u.reason = why(ue, "io_uring setup and a no-op");
#elif defined(DS_AIO_URING_DISABLED)
  u.reason = "not compiled: disabled at build time (DS_NATIVE_IO_URING=OFF)";
#else
  u.reason = "not compiled: liburing (liburing-dev) was not found when ds-native was built";
#endif
  out.push_back(u);
  Probe k{"libaio", false, false, ""};
#if defined(DS_AIO_HAVE_KAIO)
  k.compiled = true;
  aio_context_t ctx = 0;
  if (sys_io_setup(4, &ctx) == 0) {
    sys_io_destroy(ctx);
    k.usable = true;
  } else {
    k.reason = why(errno, "io_setup");
  }
#else
  k.reason = "not compiled: not a Linux build";
#endif
  out.push_back(k);
  out.push_back(Probe{"threadpool", true, true, ""});
  return out;
}

}  // namespace ds_aio
