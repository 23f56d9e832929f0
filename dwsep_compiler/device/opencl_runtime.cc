// OpenCL runtime for TVM 0.27: the device API and the module loader that the wheels lack.
//
// Why it exists: apache-tvm's wheels ship no OpenCL runtime, so a library built for an OpenCL
// target can be compiled but not loaded ("OpenCL runtime is not linked"). This file is built with
// the machine's g++ against the wheel's headers and libtvm_runtime.so (dwsep_compiler/device/
// opencl_runtime.py) and loaded into the process next to TVM's core runtime, the way the wheel's
// libtvm_runtime_cuda.so adds CUDA. It registers two global functions:
//   device_api.opencl                  the DeviceAPI for kDLOpenCL (memory, copies, sync, attributes)
//   ffi.Module.load_from_bytes.opencl  the loader of the OpenCL module embedded in a model.so
//
// Memory: a device pointer is the cl_mem itself (no image/texture scopes: our GPU rules use global
// and local memory only). One context and one in-order command queue per device; a launch is
// enqueued without waiting, copies to the host wait.
//
// The module's serialized form is the compiler's: String fmt, Map<String, FunctionInfo>, Bytes code,
// where FunctionInfo = {String name, Array<DLDataType> arg_types, Array<String> launch_param_tags,
// Array<int32> arg_extra_tags}; a String/Bytes/Array is a uint64 count then its items,
// little-endian. The kernel's packed arguments are its parameters in arg_types order followed by one
// extent per launch tag (blockIdx.* = work-groups, threadIdx.* = work-items per group).

#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/cast.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>
#include <tvm/runtime/device_api.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

// TVM's timer interface, declared as tvm/runtime/timer.h declares it: that header cannot be
// included from the wheel (it pulls tvm/runtime/tensor.h, whose tvm/support/io.h is not shipped).
// The type key is the runtime's own, so our timer is a runtime.TimerNode to Timer::Start.
namespace tvm {
namespace runtime {
class TimerNode : public ffi::Object {
 public:
  virtual void Start() = 0;
  virtual void Stop() = 0;
  virtual int64_t SyncAndGetElapsedNanos() = 0;
  virtual ~TimerNode() {}
  static constexpr const bool _type_mutable = true;
  TVM_FFI_DECLARE_OBJECT_INFO("runtime.TimerNode", TimerNode, ffi::Object);
};
}  // namespace runtime
}  // namespace tvm

namespace dwsep {
namespace opencl {

using tvm::runtime::DeviceAPI;
using tvm::runtime::DeviceAttrKind;
namespace ffi = tvm::ffi;

const char* ErrorName(cl_int code) {
  switch (code) {
    case CL_DEVICE_NOT_FOUND: return "CL_DEVICE_NOT_FOUND";
    case CL_DEVICE_NOT_AVAILABLE: return "CL_DEVICE_NOT_AVAILABLE";
    case CL_MEM_OBJECT_ALLOCATION_FAILURE: return "CL_MEM_OBJECT_ALLOCATION_FAILURE";
    case CL_OUT_OF_RESOURCES: return "CL_OUT_OF_RESOURCES";
    case CL_OUT_OF_HOST_MEMORY: return "CL_OUT_OF_HOST_MEMORY";
    case CL_BUILD_PROGRAM_FAILURE: return "CL_BUILD_PROGRAM_FAILURE";
    case CL_INVALID_VALUE: return "CL_INVALID_VALUE";
    case CL_INVALID_DEVICE: return "CL_INVALID_DEVICE";
    case CL_INVALID_MEM_OBJECT: return "CL_INVALID_MEM_OBJECT";
    case CL_INVALID_PROGRAM_EXECUTABLE: return "CL_INVALID_PROGRAM_EXECUTABLE";
    case CL_INVALID_KERNEL_NAME: return "CL_INVALID_KERNEL_NAME";
    case CL_INVALID_KERNEL_ARGS: return "CL_INVALID_KERNEL_ARGS";
    case CL_INVALID_ARG_INDEX: return "CL_INVALID_ARG_INDEX";
    case CL_INVALID_ARG_VALUE: return "CL_INVALID_ARG_VALUE";
    case CL_INVALID_ARG_SIZE: return "CL_INVALID_ARG_SIZE";
    case CL_INVALID_WORK_DIMENSION: return "CL_INVALID_WORK_DIMENSION";
    case CL_INVALID_WORK_GROUP_SIZE: return "CL_INVALID_WORK_GROUP_SIZE";
    case CL_INVALID_WORK_ITEM_SIZE: return "CL_INVALID_WORK_ITEM_SIZE";
    case CL_INVALID_BUFFER_SIZE: return "CL_INVALID_BUFFER_SIZE";
    case CL_INVALID_GLOBAL_WORK_SIZE: return "CL_INVALID_GLOBAL_WORK_SIZE";
    case -1001: return "CL_PLATFORM_NOT_FOUND_KHR (no OpenCL driver)";
    default: return "OpenCL error";
  }
}

#define DWSEP_CL_CHECK(call)                                                             \
  do {                                                                                   \
    cl_int err_ = (call);                                                                \
    if (err_ != CL_SUCCESS) {                                                            \
      TVM_FFI_THROW(RuntimeError) << #call << " failed: " << ErrorName(err_) << " (" << err_ \
                                  << ")";                                                \
    }                                                                                    \
  } while (0)

// The device the calling thread launches on (TVM's host code sets it before each kernel call).
int& CurrentDevice() {
  static thread_local int device_id = 0;
  return device_id;
}

std::string DeviceString(cl_device_id id, cl_device_info what) {
  size_t size = 0;
  DWSEP_CL_CHECK(clGetDeviceInfo(id, what, 0, nullptr, &size));
  std::string value(size, '\0');
  DWSEP_CL_CHECK(clGetDeviceInfo(id, what, size, value.data(), nullptr));
  while (!value.empty() && value.back() == '\0') value.pop_back();
  return value;
}

template <typename T>
T DeviceValue(cl_device_id id, cl_device_info what) {
  T value{};
  DWSEP_CL_CHECK(clGetDeviceInfo(id, what, sizeof(T), &value, nullptr));
  return value;
}

// --------------------------------------------------------------------------------------------
// Devices: the first platform that has a GPU, else an accelerator, else a CPU device (PoCL here).

struct Device {
  cl_device_id id;
  cl_command_queue queue;
  size_t max_work_group_size;  // read once: every launch is checked against it
};

class Workspace {
 public:
  static Workspace* Global() {
    // Never destroyed: kernels and buffers may still be released by other static destructors.
    static Workspace* inst = new Workspace();
    return inst;
  }

  // Opens the platform on first use so that loading the library never fails on a machine
  // without a driver; the error surfaces when a device is actually used.
  void Init() {
    std::lock_guard<std::mutex> lock(mu_);
    if (initialized_) return;
    initialized_ = true;
    cl_uint n_platforms = 0;
    if (clGetPlatformIDs(0, nullptr, &n_platforms) != CL_SUCCESS || n_platforms == 0) return;
    std::vector<cl_platform_id> platforms(n_platforms);
    DWSEP_CL_CHECK(clGetPlatformIDs(n_platforms, platforms.data(), nullptr));
    for (cl_device_type type : {CL_DEVICE_TYPE_GPU, CL_DEVICE_TYPE_ACCELERATOR,
                                CL_DEVICE_TYPE_CPU}) {
      for (cl_platform_id platform : platforms) {
        cl_uint n = 0;
        if (clGetDeviceIDs(platform, type, 0, nullptr, &n) != CL_SUCCESS || n == 0) continue;
        std::vector<cl_device_id> ids(n);
        DWSEP_CL_CHECK(clGetDeviceIDs(platform, type, n, ids.data(), nullptr));
        cl_int err;
        context_ = clCreateContext(nullptr, n, ids.data(), nullptr, nullptr, &err);
        DWSEP_CL_CHECK(err);
        for (cl_device_id id : ids) {
          cl_command_queue queue = clCreateCommandQueue(context_, id, 0, &err);
          DWSEP_CL_CHECK(err);
          devices_.push_back(Device{id, queue,
                                    DeviceValue<size_t>(id, CL_DEVICE_MAX_WORK_GROUP_SIZE)});
        }
        return;
      }
    }
  }

  size_t NumDevices() {
    Init();
    return devices_.size();
  }

  const Device& Get(int device_id) {
    Init();
    if (devices_.empty()) {
      TVM_FFI_THROW(RuntimeError) << "no OpenCL device found (is an OpenCL driver/ICD installed?)";
    }
    if (device_id < 0 || static_cast<size_t>(device_id) >= devices_.size()) {
      TVM_FFI_THROW(RuntimeError) << "OpenCL device " << device_id << " does not exist ("
                                  << devices_.size() << " found)";
    }
    return devices_[device_id];
  }

  cl_context context() {
    Init();
    return context_;
  }

 private:
  std::mutex mu_;
  bool initialized_ = false;
  cl_context context_ = nullptr;
  std::vector<Device> devices_;
};

// --------------------------------------------------------------------------------------------
// Device API

class OpenCLDeviceAPI final : public DeviceAPI {
 public:
  static OpenCLDeviceAPI* Global() {
    static OpenCLDeviceAPI* inst = new OpenCLDeviceAPI();
    return inst;
  }

  void SetDevice(DLDevice dev) final { CurrentDevice() = dev.device_id; }

  void GetAttr(DLDevice dev, DeviceAttrKind kind, ffi::Any* rv) final {
    Workspace* ws = Workspace::Global();
    if (kind == tvm::runtime::kExist) {
      *rv = static_cast<int64_t>(dev.device_id >= 0 &&
                                 static_cast<size_t>(dev.device_id) < ws->NumDevices());
      return;
    }
    cl_device_id id = ws->Get(dev.device_id).id;
    switch (kind) {
      case tvm::runtime::kMaxThreadsPerBlock:
        *rv = static_cast<int64_t>(DeviceValue<size_t>(id, CL_DEVICE_MAX_WORK_GROUP_SIZE));
        break;
      case tvm::runtime::kWarpSize:
        *rv = static_cast<int64_t>(1);  // OpenCL has no portable subgroup size
        break;
      case tvm::runtime::kMaxSharedMemoryPerBlock:
        *rv = static_cast<int64_t>(DeviceValue<cl_ulong>(id, CL_DEVICE_LOCAL_MEM_SIZE));
        break;
      case tvm::runtime::kComputeVersion:
      case tvm::runtime::kApiVersion: {
        // "OpenCL <major>.<minor> <vendor text>" -> "<major>.<minor>"
        std::string version = DeviceString(id, CL_DEVICE_VERSION);
        std::istringstream words(version);
        std::string word, number;
        words >> word >> number;
        *rv = ffi::String(number.empty() ? version : number);
        break;
      }
      case tvm::runtime::kDeviceName:
        *rv = ffi::String(DeviceString(id, CL_DEVICE_NAME));
        break;
      case tvm::runtime::kMaxClockRate:
        *rv = static_cast<int64_t>(DeviceValue<cl_uint>(id, CL_DEVICE_MAX_CLOCK_FREQUENCY));
        break;
      case tvm::runtime::kMultiProcessorCount:
        *rv = static_cast<int64_t>(DeviceValue<cl_uint>(id, CL_DEVICE_MAX_COMPUTE_UNITS));
        break;
      case tvm::runtime::kMaxThreadDimensions: {
        size_t dims[3] = {0, 0, 0};
        DWSEP_CL_CHECK(clGetDeviceInfo(id, CL_DEVICE_MAX_WORK_ITEM_SIZES, sizeof(dims), dims,
                                       nullptr));
        std::ostringstream out;
        out << "[" << dims[0] << ", " << dims[1] << ", " << dims[2] << "]";
        *rv = ffi::String(out.str());
        break;
      }
      case tvm::runtime::kDriverVersion:
        *rv = ffi::String(DeviceString(id, CL_DRIVER_VERSION));
        break;
      case tvm::runtime::kL2CacheSizeBytes:
        *rv = static_cast<int64_t>(DeviceValue<cl_ulong>(id, CL_DEVICE_GLOBAL_MEM_CACHE_SIZE));
        break;
      case tvm::runtime::kTotalGlobalMemory:
        *rv = static_cast<int64_t>(DeviceValue<cl_ulong>(id, CL_DEVICE_GLOBAL_MEM_SIZE));
        break;
      default:
        break;  // not known to OpenCL: left None, as TVM's other runtimes do
    }
  }

  void* AllocDataSpace(DLDevice dev, size_t nbytes, size_t alignment, DLDataType) final {
    Workspace* ws = Workspace::Global();
    ws->Get(dev.device_id);
    cl_int err;
    cl_mem mem = clCreateBuffer(ws->context(), CL_MEM_READ_WRITE, nbytes == 0 ? 1 : nbytes,
                                nullptr, &err);
    if (err != CL_SUCCESS) {
      TVM_FFI_THROW(RuntimeError) << "allocating " << nbytes << " bytes on OpenCL device "
                                  << dev.device_id << " failed: " << ErrorName(err);
    }
    return mem;
  }

  void* AllocDataSpace(DLDevice dev, int ndim, const int64_t* shape, DLDataType dtype,
                       ffi::Optional<ffi::String> mem_scope) final {
    if (mem_scope.has_value() && *mem_scope != "global") {
      TVM_FFI_THROW(RuntimeError) << "memory scope '" << *mem_scope
                                  << "' is not supported (global buffers only)";
    }
    return DeviceAPI::AllocDataSpace(dev, ndim, shape, dtype, std::nullopt);
  }

  void FreeDataSpace(DLDevice, void* ptr) final {
    if (ptr != nullptr) clReleaseMemObject(static_cast<cl_mem>(ptr));
  }

  void StreamSync(DLDevice dev, TVMStreamHandle) final {
    DWSEP_CL_CHECK(clFinish(Workspace::Global()->Get(dev.device_id).queue));
  }

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset,
                      size_t size, DLDevice dev_from, DLDevice dev_to, DLDataType,
                      TVMStreamHandle) final {
    if (size == 0) return;
    Workspace* ws = Workspace::Global();
    bool from_cl = dev_from.device_type == kDLOpenCL;
    bool to_cl = dev_to.device_type == kDLOpenCL;
    if (from_cl && to_cl) {
      cl_command_queue queue = ws->Get(dev_from.device_id).queue;
      DWSEP_CL_CHECK(clEnqueueCopyBuffer(queue, static_cast<cl_mem>(const_cast<void*>(from)),
                                         static_cast<cl_mem>(to), from_offset, to_offset, size, 0,
                                         nullptr, nullptr));
      if (dev_from.device_id != dev_to.device_id) DWSEP_CL_CHECK(clFinish(queue));
    } else if (from_cl && dev_to.device_type == kDLCPU) {
      DWSEP_CL_CHECK(clEnqueueReadBuffer(ws->Get(dev_from.device_id).queue,
                                         static_cast<cl_mem>(const_cast<void*>(from)), CL_TRUE,
                                         from_offset, size, static_cast<char*>(to) + to_offset, 0,
                                         nullptr, nullptr));
    } else if (to_cl && dev_from.device_type == kDLCPU) {
      DWSEP_CL_CHECK(clEnqueueWriteBuffer(ws->Get(dev_to.device_id).queue,
                                          static_cast<cl_mem>(to), CL_TRUE, to_offset, size,
                                          static_cast<const char*>(from) + from_offset, 0, nullptr,
                                          nullptr));
    } else {
      TVM_FFI_THROW(RuntimeError) << "OpenCL runtime: cannot copy between device types "
                                  << dev_from.device_type << " and " << dev_to.device_type;
    }
  }

};

// --------------------------------------------------------------------------------------------
// The serialized module

class Reader {
 public:
  explicit Reader(const ffi::Bytes& bytes) : data_(bytes.data()), size_(bytes.size()) {}

  uint64_t U64() { return Scalar<uint64_t>(); }

  template <typename T>
  T Scalar() {
    Need(sizeof(T));
    T value;
    std::memcpy(&value, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }

  std::string Str() {
    uint64_t n = U64();
    Need(n);
    std::string value(data_ + pos_, n);
    pos_ += n;
    return value;
  }

  bool AtEnd() const { return pos_ == size_; }

 private:
  void Need(uint64_t n) const {
    if (n > size_ - pos_) {
      TVM_FFI_THROW(RuntimeError) << "the OpenCL module in this library is truncated or not in "
                                  << "TVM 0.27's format";
    }
  }
  const char* data_;
  size_t size_;
  size_t pos_ = 0;
};

struct KernelInfo {
  std::string name;
  std::vector<DLDataType> arg_types;
  std::vector<std::string> launch_tags;
  std::vector<int32_t> extra_tags;
};

// Index of a launch tag in (group x, y, z, item x, y, z), or -1.
int LaunchSlot(const std::string& tag) {
  static const char* names[6] = {"blockIdx.x", "blockIdx.y", "blockIdx.z",
                                 "threadIdx.x", "threadIdx.y", "threadIdx.z"};
  for (int i = 0; i < 6; ++i) {
    if (tag == names[i]) return i;
  }
  return -1;
}

class OpenCLModule final : public ffi::ModuleObj {
 public:
  OpenCLModule(std::string fmt, std::unordered_map<std::string, KernelInfo> kernels,
               std::string code)
      : fmt_(std::move(fmt)), kernels_(std::move(kernels)), code_(std::move(code)) {}

  ~OpenCLModule() {
    for (auto& entry : compiled_) {
      for (auto& kernel : entry.second.kernels) clReleaseKernel(kernel.second);
      if (entry.second.program != nullptr) clReleaseProgram(entry.second.program);
    }
  }

  static ffi::Module Load(const ffi::Bytes& bytes) {
    Reader in(bytes);
    std::string fmt = in.Str();
    if (fmt != "cl") {
      TVM_FFI_THROW(RuntimeError) << "OpenCL module format '" << fmt
                                  << "' is not supported (OpenCL C source only)";
    }
    std::unordered_map<std::string, KernelInfo> kernels;
    uint64_t n = in.U64();
    for (uint64_t i = 0; i < n; ++i) {
      std::string key = in.Str();
      KernelInfo info;
      info.name = in.Str();
      uint64_t n_args = in.U64();
      for (uint64_t a = 0; a < n_args; ++a) {
        DLDataType t;
        t.code = in.Scalar<uint8_t>();
        t.bits = in.Scalar<uint8_t>();
        t.lanes = in.Scalar<uint16_t>();
        info.arg_types.push_back(t);
      }
      uint64_t n_tags = in.U64();
      for (uint64_t a = 0; a < n_tags; ++a) info.launch_tags.push_back(in.Str());
      uint64_t n_extra = in.U64();
      for (uint64_t a = 0; a < n_extra; ++a) info.extra_tags.push_back(in.Scalar<int32_t>());
      for (const std::string& tag : info.launch_tags) {
        if (LaunchSlot(tag) < 0) {
          TVM_FFI_THROW(RuntimeError) << "kernel " << info.name << ": launch parameter '" << tag
                                      << "' is not supported by this OpenCL runtime";
        }
      }
      kernels.emplace(std::move(key), std::move(info));
    }
    std::string code = in.Str();
    if (!in.AtEnd()) {
      TVM_FFI_THROW(RuntimeError) << "the OpenCL module in this library has trailing bytes "
                                  << "(not TVM 0.27's format)";
    }
    return ffi::Module(ffi::make_object<OpenCLModule>(std::move(fmt), std::move(kernels),
                                                      std::move(code)));
  }

  const char* kind() const final { return "opencl"; }

  int GetPropertyMask() const final {
    return ffi::Module::kBinarySerializable | ffi::Module::kRunnable;
  }

  ffi::Bytes SaveToBytes() const final {
    std::string out;
    auto u64 = [&out](uint64_t v) { out.append(reinterpret_cast<const char*>(&v), sizeof(v)); };
    auto str = [&out, &u64](const std::string& s) {
      u64(s.size());
      out.append(s);
    };
    str(fmt_);
    u64(kernels_.size());
    for (const auto& entry : kernels_) {
      str(entry.first);
      const KernelInfo& info = entry.second;
      str(info.name);
      u64(info.arg_types.size());
      for (const DLDataType& t : info.arg_types) {
        out.push_back(static_cast<char>(t.code));
        out.push_back(static_cast<char>(t.bits));
        out.append(reinterpret_cast<const char*>(&t.lanes), sizeof(t.lanes));
      }
      u64(info.launch_tags.size());
      for (const std::string& tag : info.launch_tags) str(tag);
      u64(info.extra_tags.size());
      for (int32_t tag : info.extra_tags) {
        out.append(reinterpret_cast<const char*>(&tag), sizeof(tag));
      }
    }
    str(code_);
    return ffi::Bytes(out);
  }

  ffi::String InspectSource(const ffi::String& format) const final {
    if (format.empty() || format == "cl" || format == "source") return ffi::String(code_);
    return ffi::String();
  }

  ffi::Optional<ffi::Function> GetFunction(const ffi::String& name) final {
    auto it = kernels_.find(std::string(name));
    if (it == kernels_.end()) return std::nullopt;
    const KernelInfo* info = &it->second;
    ffi::ObjectPtr<ffi::Object> self = ffi::GetObjectPtr<ffi::Object>(this);
    return ffi::Function::FromPacked([self, this, info](ffi::PackedArgs args, ffi::Any*) {
      this->Launch(*info, args);
    });
  }

 private:
  struct Compiled {
    cl_program program = nullptr;
    std::unordered_map<std::string, cl_kernel> kernels;
  };

  // The program is built once per device, at the first launch (a build takes PoCL ~1 s).
  cl_kernel Kernel(int device_id, const std::string& name) {
    Workspace* ws = Workspace::Global();
    cl_device_id device = ws->Get(device_id).id;
    Compiled& compiled = compiled_[device_id];
    if (compiled.program == nullptr) {
      const char* source = code_.data();
      size_t length = code_.size();
      cl_int err;
      cl_program program = clCreateProgramWithSource(ws->context(), 1, &source, &length, &err);
      DWSEP_CL_CHECK(err);
      err = clBuildProgram(program, 1, &device, nullptr, nullptr, nullptr);
      if (err != CL_SUCCESS) {
        size_t size = 0;
        clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, 0, nullptr, &size);
        std::string log(size, '\0');
        clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, size, log.data(), nullptr);
        clReleaseProgram(program);
        std::string first = log.substr(0, log.find('\n'));
        TVM_FFI_THROW(RuntimeError) << "the OpenCL driver cannot build the kernels ("
                                    << ErrorName(err) << "): " << first;
      }
      compiled.program = program;
    }
    auto found = compiled.kernels.find(name);
    if (found != compiled.kernels.end()) return found->second;
    cl_int err;
    cl_kernel kernel = clCreateKernel(compiled.program, name.c_str(), &err);
    DWSEP_CL_CHECK(err);
    compiled.kernels.emplace(name, kernel);
    return kernel;
  }

  void Launch(const KernelInfo& info, ffi::PackedArgs args) {
    size_t n_args = info.arg_types.size();
    if (static_cast<size_t>(args.size()) != n_args + info.launch_tags.size()) {
      TVM_FFI_THROW(RuntimeError) << "kernel " << info.name << " expects "
                                  << n_args + info.launch_tags.size() << " arguments, got "
                                  << args.size();
    }
    const TVMFFIAny* raw = reinterpret_cast<const TVMFFIAny*>(args.data());
    size_t extent[6] = {1, 1, 1, 1, 1, 1};
    int work_dim = 1;
    for (size_t i = 0; i < info.launch_tags.size(); ++i) {
      int slot = LaunchSlot(info.launch_tags[i]);
      int64_t value = raw[n_args + i].v_int64;
      extent[slot] = value > 0 ? static_cast<size_t>(value) : 1;
      work_dim = std::max(work_dim, slot % 3 + 1);
    }
    size_t global[3], local[3], per_group = 1;
    for (int d = 0; d < 3; ++d) {
      local[d] = extent[3 + d];
      global[d] = extent[d] * extent[3 + d];
      per_group *= local[d];
    }
    int device_id = CurrentDevice();
    Workspace* ws = Workspace::Global();
    const Device& device = ws->Get(device_id);
    size_t limit = device.max_work_group_size;
    if (per_group > limit) {
      TVM_FFI_THROW(RuntimeError) << "kernel " << info.name << " launches " << per_group
                                  << " work-items per group; the OpenCL device allows " << limit;
    }
    std::lock_guard<std::mutex> lock(mu_);  // a cl_kernel's arguments are shared state
    cl_kernel kernel = Kernel(device_id, info.name);
    for (size_t i = 0; i < n_args; ++i) {
      const DLDataType& t = info.arg_types[i];
      cl_int err;
      if (t.code == kDLOpaqueHandle) {
        cl_mem mem = static_cast<cl_mem>(raw[i].v_ptr);
        err = clSetKernelArg(kernel, i, sizeof(cl_mem), &mem);
      } else if (t.code == kDLInt || t.code == kDLUInt) {
        int64_t v = raw[i].v_int64;
        if (t.bits == 32) {
          int32_t v32 = static_cast<int32_t>(v);
          err = clSetKernelArg(kernel, i, sizeof(v32), &v32);
        } else {
          err = clSetKernelArg(kernel, i, sizeof(v), &v);
        }
      } else if (t.code == kDLFloat) {
        double v = raw[i].v_float64;
        if (t.bits == 32) {
          float v32 = static_cast<float>(v);
          err = clSetKernelArg(kernel, i, sizeof(v32), &v32);
        } else {
          err = clSetKernelArg(kernel, i, sizeof(v), &v);
        }
      } else {
        TVM_FFI_THROW(RuntimeError) << "kernel " << info.name << ": argument " << i
                                    << " has an unsupported type";
      }
      if (err != CL_SUCCESS) {
        TVM_FFI_THROW(RuntimeError) << "kernel " << info.name << ": setting argument " << i
                                    << " failed: " << ErrorName(err);
      }
    }
    cl_int err = clEnqueueNDRangeKernel(device.queue, kernel, work_dim, nullptr, global, local, 0,
                                        nullptr, nullptr);
    if (err != CL_SUCCESS) {
      TVM_FFI_THROW(RuntimeError) << "launching kernel " << info.name << " failed: "
                                  << ErrorName(err);
    }
  }

  std::string fmt_;
  std::unordered_map<std::string, KernelInfo> kernels_;
  std::string code_;
  std::mutex mu_;
  std::unordered_map<int, Compiled> compiled_;
};

// --------------------------------------------------------------------------------------------
// Timer: the wall time between two drained queues, what time_evaluator measures (without it TVM
// falls back to the same thing, with a warning).

class OpenCLTimerNode final : public tvm::runtime::TimerNode {
 public:
  explicit OpenCLTimerNode(DLDevice dev) : dev_(dev) {}
  void Start() final {
    OpenCLDeviceAPI::Global()->StreamSync(dev_, nullptr);
    start_ = std::chrono::steady_clock::now();
  }
  void Stop() final {
    OpenCLDeviceAPI::Global()->StreamSync(dev_, nullptr);
    elapsed_ = std::chrono::steady_clock::now() - start_;
  }
  int64_t SyncAndGetElapsedNanos() final {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(elapsed_).count();
  }
  TVM_FFI_DECLARE_OBJECT_INFO_FINAL("dwsep.OpenCLTimerNode", OpenCLTimerNode,
                                    tvm::runtime::TimerNode);

 private:
  DLDevice dev_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::duration elapsed_{0};
};

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def_packed("device_api.opencl",
                  [](ffi::PackedArgs, ffi::Any* rv) {
                    *rv = static_cast<void*>(OpenCLDeviceAPI::Global());
                  })
      .def("ffi.Module.load_from_bytes.opencl", OpenCLModule::Load)
      .def("runtime.timer.opencl",
           [](DLDevice dev) {
             return ffi::ObjectRef(ffi::make_object<OpenCLTimerNode>(dev));
           })
      .def("dwsep.opencl.num_devices",
           []() { return static_cast<int64_t>(Workspace::Global()->NumDevices()); });
}

}  // namespace opencl
}  // namespace dwsep
