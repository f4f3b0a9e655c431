// ds-native async file IO engine: contiguous host buffers read from / written to
// files at byte offsets, split into blocks, run by worker threads over io_uring,
// Linux kernel AIO (libaio's interface) or plain pread/pwrite.
//
// Design, in short (docs/aio.md has the long form):
// - A request is planned into blocks when it is submitted (caller's thread):
//   the 4 KiB-aligned middle goes through an O_DIRECT descriptor in
//   `block_size` pieces; an unaligned head or tail (a few bytes to 4 KiB) goes
//   through a second, buffered descriptor of the same file, so any size and any
//   offset round-trips exactly without padding or truncating the file.
// - Blocks wait in one queue; each worker thread keeps up to `queue_depth` of
//   them in flight (its own io_uring / AIO context), or, for the thread-pool
//   backend, `queue_depth * intra_op_parallelism` threads each run one block.
// - A block whose memory is not 4 KiB-aligned goes through an aligned bounce
//   buffer of its worker slot, so ordinary torch tensors keep O_DIRECT speed.
// - The first failure of a request is recorded (errno, failing range, detail);
//   its blocks not yet started are skipped, the others finish; the request then
//   reports the failure, never success.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace ds_aio {

enum class Backend { io_uring, kaio, threadpool };

const char* backend_name(Backend b);

// Whether a backend was compiled in, and whether this kernel/container lets us
// use it now (the probe creates and destroys a small context). `reason` says
// why not.
struct Probe {
  std::string name;
  bool compiled = false;
  bool usable = false;
  std::string reason;
};
std::vector<Probe> probe_backends();

constexpr int64_t kAlign = 4096;

// What a finished request reports. errnum == 0: success.
struct Result {
  int64_t id = 0;
  bool read = false;
  std::string path;
  int64_t offset = 0;   // the request's file offset and size
  int64_t nbytes = 0;
  int errnum = 0;
  int64_t fail_offset = 0;  // the block that failed first
  int64_t fail_len = 0;
  std::string detail;       // e.g. "file ends at byte 123"
};

struct Request {
  Result res;
  char* buf = nullptr;
  int fd_direct = -1;
  int fd_buffered = -1;
  std::pair<uint64_t, uint64_t> inode{0, 0};  // (st_dev, st_ino): writes in flight per file
  std::atomic<int64_t> blocks_left{0};
  std::atomic<bool> failed{false};
  std::mutex err_mu;
};

struct Block {
  std::shared_ptr<Request> req;
  int64_t file_off = 0;
  char* buf = nullptr;
  int64_t len = 0;
  bool direct = false;  // through fd_direct (aligned file range and length)
  bool inline_sync = false;  // a small head/tail: run by the worker with pread/pwrite
};

// One ring worker's queue of in-flight operations (io_uring or kernel AIO).
class Ring {
 public:
  virtual ~Ring() = default;
  virtual void prep(int slot, int fd, void* buf, size_t len, int64_t off, bool read) = 0;
  // Hands the prepared operations to the kernel.
  // Appends (slot, -errno) for operations the kernel refused (the engine runs those with
  // pread/pwrite); returns non-zero when the ring must not be used again.
  virtual int submit(std::vector<std::pair<int, int64_t>>& rejected) = 0;
  // Waits for at least `min_complete` completions and appends (slot, result);
  // result is bytes done or -errno. Returns 0 or -errno.
  virtual int reap(int min_complete, std::vector<std::pair<int, int64_t>>& out) = 0;
};

// nullptr with *err = errno when the context cannot be created.
std::unique_ptr<Ring> make_uring(int queue_depth, int* err);
std::unique_ptr<Ring> make_kaio(int queue_depth, int* err);

struct Options {
  Backend backend = Backend::threadpool;
  int64_t block_size = 1 << 20;
  int queue_depth = 8;
  int intra_op_parallelism = 1;
  bool single_submit = false;
  bool overlap_events = true;
  bool use_direct = true;
};

class Engine {
 public:
  explicit Engine(const Options& opt);  // throws std::system_error if the backend cannot start
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Opens the file and queues the request; returns the request id (> 0). When the
  // request cannot start (open fails, a read past the end of the file) returns 0
  // and fills `error`; nothing is queued then.
  int64_t submit(bool read, char* buf, int64_t nbytes, const std::string& path, int64_t offset, Result& error);
  // Waits until nothing is outstanding; returns every result not yet collected, in id order.
  std::vector<Result> wait_all();
  // Waits for one request and moves its result to `out` (wait_all will not report it
  // again); false when `id` is unknown or already collected.
  bool wait_one(int64_t id, Result& out);
  int64_t outstanding() const;
  const Options& options() const { return opt_; }

 private:
  bool pop_block(Block& b, bool block);
  void finish_block(const Block& b, int errnum, int64_t fail_off, int64_t fail_len, const std::string& detail);
  void fail(Request& r, int errnum, int64_t off, int64_t len, const std::string& detail);
  void complete(Request& r);
  // Runs a block synchronously (pread/pwrite loop, bounce when needed); returns 0 or errno.
  int run_sync(const Block& b, char* bounce, int64_t start, std::string& detail, int64_t& fail_off);
  void pool_worker();
  void ring_worker(Ring* ring);

  Options opt_;
  std::vector<std::unique_ptr<Ring>> rings_;
  std::vector<std::thread> threads_;
  mutable std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<Block> queue_;
  std::map<int64_t, Result> done_;  // finished, not yet collected
  int64_t pending_ = 0;             // submitted, not finished
  std::set<int64_t> pending_ids_;
  std::map<std::pair<uint64_t, uint64_t>, int> writes_in_flight_;
  int64_t next_id_ = 1;
  bool stop_ = false;
};

}  // namespace ds_aio
