// The IO engine: request planning, the block queue, the workers, completion.
// See engine.h for the design.
#include "aio/engine.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <system_error>

#ifndef O_DIRECT
#define O_DIRECT 0  // not Linux: every block then goes through the buffered descriptor
#endif

namespace ds_aio {

const char* backend_name(Backend b) {
  switch (b) {
    case Backend::io_uring:
      return "io_uring";
    case Backend::kaio:
      return "libaio";
    case Backend::threadpool:
      return "threadpool";
  }
  return "?";
}

namespace {

bool aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) % kAlign) == 0; }

int64_t file_size(int fd) {
  struct stat st{};
  return fstat(fd, &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
}

// An aligned scratch buffer of one block, allocated the first time a worker slot
// meets memory that O_DIRECT cannot use in place.
// Blocks of 2 MiB and more start on a huge-page boundary and ask for transparent huge pages:
// O_DIRECT pins and maps the memory of every operation page by page (see aligned_empty).
char* alloc_bounce(int64_t block_size) {
  constexpr int64_t kHuge = int64_t{2} << 20;
  const bool huge = block_size >= kHuge;
  void* p = nullptr;
  if (posix_memalign(&p, static_cast<size_t>(huge ? kHuge : kAlign), static_cast<size_t>(block_size)) != 0) {
    return nullptr;
  }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge) madvise(p, static_cast<size_t>(block_size / kHuge * kHuge), MADV_HUGEPAGE);
#endif
  return static_cast<char*>(p);
}

}  // namespace

Engine::Engine(const Options& opt) : opt_(opt) {
  if (opt_.block_size <= 0 || opt_.block_size % kAlign != 0 || opt_.block_size > (int64_t{1} << 30)) {
    throw std::invalid_argument("block_size must be a positive multiple of 4096 up to 1 GiB");
  }
  if (opt_.queue_depth < 1 || opt_.queue_depth > 4096) throw std::invalid_argument("queue_depth must be 1..4096");
  if (opt_.intra_op_parallelism < 1 || opt_.intra_op_parallelism > 256) {
    throw std::invalid_argument("intra_op_parallelism must be 1..256");
  }
  if (opt_.backend == Backend::threadpool) {
    // Synchronous pread/pwrite: the queue depth is the number of threads in the kernel at once.
    const int n = std::min(opt_.queue_depth * opt_.intra_op_parallelism, 256);
    for (int i = 0; i < n; ++i) threads_.emplace_back([this] { pool_worker(); });
    return;
  }
  for (int i = 0; i < opt_.intra_op_parallelism; ++i) {
    int err = 0;
    std::unique_ptr<Ring> ring = opt_.backend == Backend::io_uring ? make_uring(opt_.queue_depth, &err)
                                                                   : make_kaio(opt_.queue_depth, &err);
    if (!ring) {
      throw std::system_error(err, std::generic_category(),
                              std::string("cannot create the ") + backend_name(opt_.backend) + " context");
    }
    rings_.push_back(std::move(ring));
  }
  for (auto& r : rings_) threads_.emplace_back([this, ring = r.get()] { ring_worker(ring); });
}

Engine::~Engine() {
  {
    // Buffers belong to the caller: never leave an operation running into them.
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return pending_ == 0; });
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : threads_) t.join();
}

int64_t Engine::outstanding() const {
  std::lock_guard<std::mutex> lk(mu_);
  return pending_;
}

int64_t Engine::submit(bool read, char* buf, int64_t nbytes, const std::string& path, int64_t offset,
                       Result& error) {
  auto req = std::make_shared<Request>();
  Result& r = req->res;
  r.read = read;
  r.path = path;
  r.offset = offset;
  r.nbytes = nbytes;
  req->buf = buf;
  auto refuse = [&](int errnum, const std::string& detail) {
    if (req->fd_direct >= 0) close(req->fd_direct);
    if (req->fd_buffered >= 0) close(req->fd_buffered);
    r.errnum = errnum;
    r.fail_offset = offset;
    r.fail_len = nbytes;
    r.detail = detail;
    error = r;
    return int64_t{0};
  };
  if (nbytes < 0 || offset < 0) return refuse(EINVAL, "negative size or offset");
  // Writes create the file and never truncate it: a request may fill one region of a larger file.
  const int flags = (read ? O_RDONLY : (O_WRONLY | O_CREAT)) | O_CLOEXEC;
  req->fd_buffered = open(path.c_str(), flags, 0644);
  if (req->fd_buffered < 0) return refuse(errno, "cannot open the file");
  struct stat st{};
  if (fstat(req->fd_buffered, &st) != 0) return refuse(errno, "cannot stat the file");
  req->inode = {static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino)};
  if (read && S_ISREG(st.st_mode) && offset + nbytes > st.st_size) {
    // A write of this handle still in flight may be extending the file: then the
    // worker's end-of-file check decides, when the read runs.
    std::lock_guard<std::mutex> lk(mu_);
    if (writes_in_flight_.count(req->inode) == 0) {
      return refuse(ENODATA, "the read needs bytes up to " + std::to_string(offset + nbytes) + " but the file has " +
                                 std::to_string(st.st_size));
    }
  }
  if (opt_.use_direct && nbytes > 0) {
    // Filesystems without O_DIRECT (EINVAL) fall back to buffered IO for this request.
    req->fd_direct = open(path.c_str(), (read ? O_RDONLY : O_WRONLY) | O_DIRECT | O_CLOEXEC);
  }

  std::vector<Block> blocks;
  auto add = [&](int64_t off, int64_t len, bool direct, bool inline_sync) {
    blocks.push_back(Block{req, off, buf + (off - offset), len, direct, inline_sync});
  };
  const int64_t end = offset + nbytes;
  if (req->fd_direct >= 0) {
    const int64_t a = (offset + kAlign - 1) / kAlign * kAlign;
    const int64_t b = end / kAlign * kAlign;
    if (a >= b) {
      add(offset, nbytes, false, true);
    } else {
      if (offset < a) add(offset, a - offset, false, true);
      for (int64_t o = a; o < b; o += opt_.block_size) add(o, std::min(opt_.block_size, b - o), true, false);
      if (b < end) add(b, end - b, false, true);
    }
  } else {
    for (int64_t o = offset; o < end; o += opt_.block_size) add(o, std::min(opt_.block_size, end - o), false, false);
  }
  req->blocks_left = static_cast<int64_t>(blocks.size());
  int64_t id;
  {
    std::lock_guard<std::mutex> lk(mu_);
    id = next_id_++;
    r.id = id;
    ++pending_;
    pending_ids_.insert(id);
    if (!read) ++writes_in_flight_[req->inode];
    for (auto& b : blocks) queue_.push_back(std::move(b));
  }
  if (blocks.empty()) {
    complete(*req);
  } else {
    work_cv_.notify_all();
  }
  return id;
}

std::vector<Result> Engine::wait_all() {
  std::unique_lock<std::mutex> lk(mu_);
  done_cv_.wait(lk, [&] { return pending_ == 0; });
  std::vector<Result> out;
  out.reserve(done_.size());
  for (auto& kv : done_) out.push_back(std::move(kv.second));
  done_.clear();
  return out;
}

bool Engine::wait_one(int64_t id, Result& out) {
  std::unique_lock<std::mutex> lk(mu_);
  if (id <= 0 || id >= next_id_) return false;
  done_cv_.wait(lk, [&] { return done_.count(id) != 0 || pending_ids_.count(id) == 0; });
  auto it = done_.find(id);
  if (it == done_.end()) return false;  // collected already
  out = std::move(it->second);
  done_.erase(it);
  return true;
}

bool Engine::pop_block(Block& b, bool block) {
  std::unique_lock<std::mutex> lk(mu_);
  if (block) work_cv_.wait(lk, [&] { return !queue_.empty() || stop_; });
  if (queue_.empty()) return false;
  b = std::move(queue_.front());
  queue_.pop_front();
  return true;
}

void Engine::fail(Request& r, int errnum, int64_t off, int64_t len, const std::string& detail) {
  std::lock_guard<std::mutex> lk(r.err_mu);
  if (r.failed.load()) return;  // the first failure is the one reported
  r.res.errnum = errnum;
  r.res.fail_offset = off;
  r.res.fail_len = len;
  r.res.detail = detail;
  r.failed.store(true);
}

void Engine::finish_block(const Block& b, int errnum, int64_t fail_off, int64_t fail_len, const std::string& detail) {
  Request& r = *b.req;
  if (errnum != 0) fail(r, errnum, fail_off, fail_len, detail);
  if (r.blocks_left.fetch_sub(1) == 1) complete(r);
}

void Engine::complete(Request& r) {
  if (r.fd_direct >= 0) close(r.fd_direct);
  if (r.fd_buffered >= 0) close(r.fd_buffered);
  r.fd_direct = r.fd_buffered = -1;
  {
    std::lock_guard<std::mutex> lk(mu_);
    done_[r.res.id] = r.res;
    pending_ids_.erase(r.res.id);
    --pending_;
    if (!r.res.read) {
      auto it = writes_in_flight_.find(r.inode);
      if (it != writes_in_flight_.end() && --it->second == 0) writes_in_flight_.erase(it);
    }
  }
  done_cv_.notify_all();
}

int Engine::run_sync(const Block& b, char* bounce, int64_t start, std::string& detail, int64_t& fail_off) {
  const Request& r = *b.req;
  const bool read = r.res.read;
  int fd = b.direct ? r.fd_direct : r.fd_buffered;
  bool use_bounce = b.direct && !aligned(b.buf) && bounce != nullptr;
  if (b.direct && !aligned(b.buf) && bounce == nullptr) fd = r.fd_buffered;  // no scratch: buffered IO
  if (start > 0) {  // the rest of a short transfer: its offset may be unaligned
    fd = r.fd_buffered;
    use_bounce = false;
  }
  auto leave_bounce = [&](int64_t done) {
    // Switching to buffered IO mid-block: move what was read so far to the caller's buffer.
    if (use_bounce && read) memcpy(b.buf, bounce, static_cast<size_t>(done));
    use_bounce = false;
    fd = r.fd_buffered;
  };
  if (use_bounce && !read) memcpy(bounce, b.buf, static_cast<size_t>(b.len));
  int64_t done = start;
  while (done < b.len) {
    char* p = (use_bounce ? bounce : b.buf) + done;
    const size_t n = static_cast<size_t>(b.len - done);
    const ssize_t k = read ? pread(fd, p, n, b.file_off + done) : pwrite(fd, p, n, b.file_off + done);
    if (k < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      if (errno == EINVAL && fd == r.fd_direct) {  // stricter O_DIRECT rules than 4 KiB: go buffered
        leave_bounce(done);
        continue;
      }
      fail_off = b.file_off + done;
      return errno;
    }
    if (k == 0) {
      fail_off = b.file_off + done;
      if (read) {
        detail = "the file ends at byte " + std::to_string(file_size(r.fd_buffered)) + " (short read)";
        return ENODATA;
      }
      detail = "the write made no progress (short write)";
      return ENOSPC;
    }
    done += k;
    if (done < b.len && fd == r.fd_direct && done % kAlign != 0) leave_bounce(done);
  }
  if (use_bounce && read) memcpy(b.buf, bounce, static_cast<size_t>(b.len));
  return 0;
}

void Engine::pool_worker() {
  char* bounce = nullptr;
  bool no_bounce = false;
  for (;;) {
    Block b;
    if (!pop_block(b, true)) break;  // stopping
    if (b.req->failed.load()) {      // its request already failed: skip, do not touch the file
      finish_block(b, 0, 0, 0, {});
      continue;
    }
    if (b.direct && !aligned(b.buf) && bounce == nullptr && !no_bounce) {
      bounce = alloc_bounce(opt_.block_size);
      no_bounce = bounce == nullptr;
    }
    std::string detail;
    int64_t fail_off = 0;
    const int err = run_sync(b, bounce, 0, detail, fail_off);
    finish_block(b, err, fail_off, b.len - (fail_off - b.file_off), detail);
  }
  free(bounce);
}

void Engine::ring_worker(Ring* ring) {
  struct Slot {
    Block b;
    char* bounce = nullptr;
    bool bounced = false;
  };
  const int qd = opt_.queue_depth;
  std::vector<Slot> slots(static_cast<size_t>(qd));
  std::vector<int> free_slots;
  for (int i = qd - 1; i >= 0; --i) free_slots.push_back(i);
  int inflight = 0;
  bool broken = false;  // the ring refused to submit: everything else runs synchronously
  std::vector<std::pair<int, int64_t>> events;
  int reap_failures = 0;

  auto run_inline = [&](const Block& b, char* bounce) {
    std::string detail;
    int64_t fail_off = 0;
    const int err = run_sync(b, bounce, 0, detail, fail_off);
    finish_block(b, err, fail_off, b.len - (fail_off - b.file_off), detail);
  };
  // One finished ring operation: `res` bytes done or -errno.
  auto on_event = [&](int s, int64_t res) {
    Slot& sl = slots[static_cast<size_t>(s)];
    Block b = std::move(sl.b);
    sl.b = Block{};
    --inflight;
    free_slots.push_back(s);
    const bool read = b.req->res.read;
    if (res < 0) {
      const int err = static_cast<int>(-res);
      if (err == EINVAL || err == EAGAIN || err == EINTR || err == EOPNOTSUPP) {
        // Rejected by the ring or by O_DIRECT's rules, not by the disk: do it with pread/pwrite.
        Block retry = b;
        if (err == EINVAL) retry.direct = false;
        run_inline(retry, sl.bounce);
      } else {
        finish_block(b, err, b.file_off, b.len, {});
      }
      return;
    }
    if (sl.bounced && read) memcpy(b.buf, sl.bounce, static_cast<size_t>(res));
    if (res < b.len) {  // short transfer: finish it synchronously, which also diagnoses EOF / ENOSPC
      std::string detail;
      int64_t fail_off = 0;
      const int err = run_sync(b, nullptr, res, detail, fail_off);
      finish_block(b, err, fail_off, b.len - (fail_off - b.file_off), detail);
      return;
    }
    finish_block(b, 0, 0, 0, {});
  };
  auto submit = [&] {
    events.clear();
    if (ring->submit(events) != 0) broken = true;
    for (auto& [s, res] : events) on_event(s, res);  // rejected operations
  };

  for (;;) {
    // overlap_events=false: DeepSpeed's lock-step mode, a batch is refilled only once all of it finished.
    const bool may_fill = opt_.overlap_events || inflight == 0;
    int prepared = 0;
    while (may_fill && !free_slots.empty()) {
      Block b;
      const bool block = inflight == 0 && prepared == 0;
      if (!pop_block(b, block)) {
        if (block) {  // stopping, and nothing of ours is in flight
          for (auto& sl : slots) free(sl.bounce);
          return;
        }
        break;
      }
      if (b.req->failed.load()) {
        finish_block(b, 0, 0, 0, {});
        continue;
      }
      const int s = free_slots.back();
      Slot& sl = slots[static_cast<size_t>(s)];
      if (b.direct && !aligned(b.buf) && sl.bounce == nullptr) sl.bounce = alloc_bounce(opt_.block_size);
      if (b.inline_sync || broken) {
        run_inline(b, sl.bounce);
        continue;
      }
      free_slots.pop_back();
      const Request& r = *b.req;
      char* p = b.buf;
      sl.bounced = false;
      int fd = b.direct ? r.fd_direct : r.fd_buffered;
      if (b.direct && !aligned(p)) {
        if (sl.bounce != nullptr) {
          if (!r.res.read) memcpy(sl.bounce, p, static_cast<size_t>(b.len));
          p = sl.bounce;
          sl.bounced = true;
        } else {
          fd = r.fd_buffered;  // out of memory for scratch: buffered IO still works
        }
      }
      ring->prep(s, fd, p, static_cast<size_t>(b.len), b.file_off, r.res.read);
      sl.b = std::move(b);
      ++prepared;
      ++inflight;
      if (opt_.single_submit) submit();
    }
    if (prepared > 0 && !opt_.single_submit) submit();
    if (inflight == 0) continue;
    events.clear();
    const int err = ring->reap(opt_.overlap_events ? 1 : inflight, events);
    if (err != 0 && err != -EINTR && events.empty()) {
      // The ring cannot deliver completions. Its operations may still be running into the
      // caller's buffers, so they cannot be reported done or failed: retry for a while, then
      // stop the process loudly rather than hang or hand back memory the kernel still writes.
      if (++reap_failures > 10000) {
        fprintf(stderr, "ds_native.aio: %s completion wait keeps failing (%s); aborting\n",
                backend_name(opt_.backend), strerror(-err));
        std::abort();
      }
      usleep(100);
      continue;
    }
    reap_failures = 0;
    for (auto& [s, res] : events) on_event(s, res);
  }
}

}  // namespace ds_aio
