// Python bindings of the IO engine (module ds_native._ds_native_aio). Buffers
// arrive as raw addresses + sizes: ds_native.aio checks the tensors (CPU,
// contiguous) and keeps them alive until their requests are collected.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <system_error>
#include <tuple>
#include <vector>

#include "aio/engine.h"

namespace nb = nanobind;

namespace {

// (id, read, path, offset, nbytes, errno, fail_offset, fail_len, detail)
using ResultTuple = std::tuple<int64_t, bool, std::string, int64_t, int64_t, int, int64_t, int64_t, std::string>;

ResultTuple to_tuple(const ds_aio::Result& r) {
  return {r.id, r.read, r.path, r.offset, r.nbytes, r.errnum, r.fail_offset, r.fail_len, r.detail};
}

ds_aio::Backend parse_backend(const std::string& name) {
  if (name == "io_uring") return ds_aio::Backend::io_uring;
  if (name == "libaio") return ds_aio::Backend::kaio;
  if (name == "threadpool") return ds_aio::Backend::threadpool;
  throw std::invalid_argument("unknown aio backend '" + name + "' (io_uring, libaio, threadpool)");
}

struct PyEngine {
  std::unique_ptr<ds_aio::Engine> engine;
  std::string backend;
};

ds_aio::Engine& live(PyEngine& self) {
  if (!self.engine) throw std::runtime_error("this aio handle is closed");
  return *self.engine;
}

}  // namespace

NB_MODULE(_ds_native_aio, m) {
  m.doc() = "ds-native async file IO engine (internal: ds_native.aio is the API)";

  m.def("probe", [] {
    std::vector<std::tuple<std::string, bool, bool, std::string>> out;
    for (const auto& p : ds_aio::probe_backends()) out.emplace_back(p.name, p.compiled, p.usable, p.reason);
    return out;
  }, "(name, compiled, usable, reason) per backend, probed now.");

  nb::class_<PyEngine>(m, "Engine")
      .def(
          "__init__",
          [](PyEngine* self, const std::string& backend, int64_t block_size, int queue_depth, int intra_op,
             bool single_submit, bool overlap_events, bool use_direct) {
            ds_aio::Options o;
            o.backend = parse_backend(backend);
            o.block_size = block_size;
            o.queue_depth = queue_depth;
            o.intra_op_parallelism = intra_op;
            o.single_submit = single_submit;
            o.overlap_events = overlap_events;
            o.use_direct = use_direct;
            std::unique_ptr<ds_aio::Engine> engine;
            try {
              engine = std::make_unique<ds_aio::Engine>(o);
            } catch (const std::system_error& e) {
              // errno travels in the message's prefix for the Python side to re-raise as OSError.
              throw std::runtime_error("errno " + std::to_string(e.code().value()) + ": " + e.what());
            }
            new (self) PyEngine{std::move(engine), backend};
          },
          nb::arg("backend"), nb::arg("block_size"), nb::arg("queue_depth"), nb::arg("intra_op_parallelism"),
          nb::arg("single_submit"), nb::arg("overlap_events"), nb::arg("use_direct"))
      .def(
          "submit",
          [](PyEngine& self, bool read, uintptr_t address, int64_t nbytes, const std::string& path, int64_t offset) {
            ds_aio::Result err;
            int64_t id;
            {
              nb::gil_scoped_release release;  // open() may block (network filesystems)
              id = live(self).submit(read, reinterpret_cast<char*>(address), nbytes, path, offset, err);
            }
            return std::make_tuple(id, to_tuple(err));
          },
          nb::arg("read"), nb::arg("address"), nb::arg("nbytes"), nb::arg("path"), nb::arg("offset"),
          "Queue a request; (id, error) with id 0 when it could not start.")
      .def(
          "wait_all",
          [](PyEngine& self) {
            std::vector<ds_aio::Result> rs;
            {
              nb::gil_scoped_release release;
              rs = live(self).wait_all();
            }
            std::vector<ResultTuple> out;
            out.reserve(rs.size());
            for (const auto& r : rs) out.push_back(to_tuple(r));
            return out;
          },
          "Wait for every outstanding request; the results not collected yet, in id order.")
      .def(
          "wait_one",
          [](PyEngine& self, int64_t id) {
            ds_aio::Result r;
            bool found;
            {
              nb::gil_scoped_release release;
              found = live(self).wait_one(id, r);
            }
            if (!found) throw std::invalid_argument("unknown or already collected request id " + std::to_string(id));
            return to_tuple(r);
          },
          nb::arg("id"), "Wait for one request and collect its result.")
      .def("outstanding", [](PyEngine& self) { return live(self).outstanding(); })
      .def("close",
           [](PyEngine& self) {
             nb::gil_scoped_release release;
             self.engine.reset();  // waits for outstanding requests, joins the workers
           })
      .def_ro("backend", &PyEngine::backend);
}
