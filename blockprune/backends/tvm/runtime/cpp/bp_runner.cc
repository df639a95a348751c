// blockprune artifact runner: loads a compiled Relax library and runs its "main" once.
//
// Why C++ and only tvm-ffi headers: it must run where no Python TVM exists (an ARM board, or
// qemu-aarch64 here), linked against the runtime libraries of the PyPI aarch64 wheels, whose
// tvm/runtime headers do not compile on their own (see tvm-notes).
//
// usage: bp_runner LIB.so IN_DIR OUT_DIR
//   IN_DIR/inputs.txt: one line per input, in order: "<dtype> <ndim> <d0> <d1> ..."
//   IN_DIR/in<i>.bin:  its raw little-endian bytes (C order)
//   writes OUT_DIR/out<i>.bin and OUT_DIR/outputs.txt (same line format)
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// TVM kernels assume 64-byte aligned buffers (kAllocAlignment) and use aligned vector loads:
// malloc's 16 bytes is enough for NEON but faults on x86 AVX. Round the size up as aligned_alloc asks.
struct CPUAlloc {
  static constexpr size_t kAlign = 64;
  void AllocData(DLTensor* t) {
    size_t bytes = (ffi::GetDataSize(*t) + kAlign - 1) / kAlign * kAlign;
    t->data = std::aligned_alloc(kAlign, bytes ? bytes : kAlign);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

DLDataType ParseDtype(const std::string& s) {
  if (s == "float32") return DLDataType{kDLFloat, 32, 1};
  if (s == "float16") return DLDataType{kDLFloat, 16, 1};
  if (s == "int64") return DLDataType{kDLInt, 64, 1};
  if (s == "int32") return DLDataType{kDLInt, 32, 1};
  if (s == "bool") return DLDataType{kDLBool, 8, 1};
  throw std::runtime_error("unsupported dtype " + s);
}

std::string DtypeName(DLDataType t) {
  if (t.code == kDLFloat && t.bits == 32) return "float32";
  if (t.code == kDLFloat && t.bits == 16) return "float16";
  if (t.code == kDLInt && t.bits == 64) return "int64";
  if (t.code == kDLInt && t.bits == 32) return "int32";
  if (t.code == kDLBool) return "bool";
  return "unknown";
}

std::vector<char> ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void WriteTensor(const ffi::Tensor& t, const std::string& dir, int i, std::ostream& spec) {
  const DLTensor* d = t.GetDLTensorPtr();
  spec << DtypeName(d->dtype) << " " << d->ndim;
  for (int k = 0; k < d->ndim; ++k) spec << " " << d->shape[k];
  spec << "\n";
  std::ofstream f(dir + "/out" + std::to_string(i) + ".bin", std::ios::binary);
  f.write(static_cast<const char*>(d->data) + d->byte_offset, ffi::GetDataSize(*d));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " LIB.so IN_DIR OUT_DIR\n";
    return 2;
  }
  try {
    std::string lib = argv[1], in_dir = argv[2], out_dir = argv[3];
    DLDevice cpu{kDLCPU, 0};
    std::vector<ffi::Any> args;
    std::ifstream spec(in_dir + "/inputs.txt");
    std::string line;
    for (int i = 0; std::getline(spec, line); ++i) {
      if (line.empty()) continue;
      std::istringstream ls(line);
      std::string dtype;
      int ndim = 0;
      ls >> dtype >> ndim;
      std::vector<int64_t> shape(ndim);
      for (auto& s : shape) ls >> s;
      ffi::Tensor t = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(shape), ParseDtype(dtype), cpu);
      std::vector<char> bytes = ReadFile(in_dir + "/in" + std::to_string(i) + ".bin");
      if (bytes.size() != ffi::GetDataSize(t)) {
        std::cerr << "input " << i << ": " << bytes.size() << " bytes, expected "
                  << ffi::GetDataSize(t) << "\n";
        return 3;
      }
      std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
      args.emplace_back(t);
    }
    ffi::Module mod = ffi::Module::LoadFromFile(lib);
    ffi::Function load = mod->GetFunction("vm_load_executable").value();
    ffi::Module vm = load().cast<ffi::Module>();
    ffi::Function init = vm->GetFunction("vm_initialization").value();
    init(static_cast<int>(kDLCPU), 0, 2 /* pooled allocator */);
    ffi::Function main_fn = vm->GetFunction("main").value();
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any ret;
    main_fn.CallPacked(views.data(), static_cast<int32_t>(views.size()), &ret);
    std::ofstream out_spec(out_dir + "/outputs.txt");
    if (auto t = ret.as<ffi::Tensor>()) {
      WriteTensor(*t, out_dir, 0, out_spec);
    } else {
      auto arr = ret.cast<ffi::Array<ffi::Any>>();
      for (size_t i = 0; i < arr.size(); ++i) WriteTensor(arr[i].cast<ffi::Tensor>(), out_dir, i, out_spec);
    }
  } catch (const std::exception& e) {
    std::cerr << "bp_runner: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
