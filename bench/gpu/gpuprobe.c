/* gpuprobe: drives a real GPU through the CUDA driver API for the hami-rs
 * GPU validation suite (bench/gpu/run.sh). No CUDA headers or nvcc needed:
 * the driver is dlopen'ed and the kernels are PTX, JIT-compiled by the
 * driver.
 *
 *   gpuprobe mem <limit-bytes>     view and allocations around the limit
 *   gpuprobe quota <seconds> <us>  steady stream of <us> kernels; prints share
 *   gpuprobe launch <n>            n empty launches; prints ns per launch
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext, *CUmodule, *CUfunction, *CUstream, *CUevent;
typedef unsigned long long CUdeviceptr;

static CUresult (*cuInit)(unsigned);
static CUresult (*cuDeviceGet)(CUdevice *, int);
static CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
static CUresult (*cuCtxSetCurrent)(CUcontext);
static CUresult (*cuCtxSynchronize)(void);
static CUresult (*cuMemGetInfo)(size_t *, size_t *);
static CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
static CUresult (*cuMemFree)(CUdeviceptr);
static CUresult (*cuModuleLoadData)(CUmodule *, const void *);
static CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *);
static CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                  unsigned, CUstream, void **, void **);
static CUresult (*cuEventCreate)(CUevent *, unsigned);
static CUresult (*cuEventRecord)(CUevent, CUstream);
static CUresult (*cuEventSynchronize)(CUevent);
static CUresult (*cuEventElapsedTime)(float *, CUevent, CUevent);

static const char *PTX =
    ".version 7.0\n.target sm_70\n.address_size 64\n"
    ".visible .entry spin(.param .u64 cycles)\n{\n"
    "  .reg .pred p;\n  .reg .u64 t0, t1, c, d;\n"
    "  ld.param.u64 c, [cycles];\n  mov.u64 t0, %clock64;\n"
    "L: mov.u64 t1, %clock64;\n  sub.u64 d, t1, t0;\n  setp.lt.u64 p, d, c;\n"
    "  @p bra L;\n  ret;\n}\n"
    ".visible .entry empty()\n{\n  ret;\n}\n";

#define CHECK(x)                                                                 \
  do {                                                                           \
    CUresult r_ = (x);                                                           \
    if (r_) { fprintf(stderr, "%s failed: %d\n", #x, r_); exit(1); }             \
  } while (0)

static void *sym(void *h, const char *n) {
  void *p = dlsym(h, n);
  if (!p) { fprintf(stderr, "missing %s\n", n); exit(1); }
  return p;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  if (argc < 2) { fprintf(stderr, "usage: gpuprobe mem|quota|launch ...\n"); return 2; }
  void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (!h) { fprintf(stderr, "no libcuda.so.1\n"); return 1; }
  *(void **)&cuInit = sym(h, "cuInit");
  *(void **)&cuDeviceGet = sym(h, "cuDeviceGet");
  *(void **)&cuDevicePrimaryCtxRetain = sym(h, "cuDevicePrimaryCtxRetain");
  *(void **)&cuCtxSetCurrent = sym(h, "cuCtxSetCurrent");
  *(void **)&cuCtxSynchronize = sym(h, "cuCtxSynchronize");
  *(void **)&cuMemGetInfo = sym(h, "cuMemGetInfo_v2");
  *(void **)&cuMemAlloc = sym(h, "cuMemAlloc_v2");
  *(void **)&cuMemFree = sym(h, "cuMemFree_v2");
  *(void **)&cuModuleLoadData = sym(h, "cuModuleLoadData");
  *(void **)&cuModuleGetFunction = sym(h, "cuModuleGetFunction");
  *(void **)&cuLaunchKernel = sym(h, "cuLaunchKernel");
  *(void **)&cuEventCreate = sym(h, "cuEventCreate");
  *(void **)&cuEventRecord = sym(h, "cuEventRecord");
  *(void **)&cuEventSynchronize = sym(h, "cuEventSynchronize");
  *(void **)&cuEventElapsedTime = sym(h, "cuEventElapsedTime");

  CUdevice dev;
  CUcontext ctx;
  CHECK(cuInit(0));
  CHECK(cuDeviceGet(&dev, 0));
  CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
  CHECK(cuCtxSetCurrent(ctx));

  if (!strcmp(argv[1], "mem") && argc > 2) {
    size_t limit = strtoull(argv[2], 0, 10), free_b, total;
    CHECK(cuMemGetInfo(&free_b, &total));
    CUdeviceptr a = 0, b = 0;
    CUresult over = cuMemAlloc(&a, free_b + (1 << 20));
    if (!over) cuMemFree(a);
    CUresult under = cuMemAlloc(&b, free_b - (64 << 20));
    size_t free2, total2;
    CHECK(cuMemGetInfo(&free2, &total2));
    if (!under) cuMemFree(b);
    printf("mem total=%zu free=%zu limit=%zu over_1MiB=%d under=%d free_after=%zu\n", total, free_b, limit, over,
           under, free2);
    return 0;
  }

  CUmodule mod;
  CUfunction spin, empty;
  CHECK(cuModuleLoadData(&mod, PTX));
  CHECK(cuModuleGetFunction(&spin, mod, "spin"));
  CHECK(cuModuleGetFunction(&empty, mod, "empty"));

  if (!strcmp(argv[1], "launch") && argc > 2) {
    long n = atol(argv[2]);
    for (int i = 0; i < 1000; i++) CHECK(cuLaunchKernel(empty, 1, 1, 1, 32, 1, 1, 0, 0, 0, 0));
    CHECK(cuCtxSynchronize());
    double t0 = now();
    for (long i = 0; i < n; i++) CHECK(cuLaunchKernel(empty, 1, 1, 1, 32, 1, 1, 0, 0, 0, 0));
    CHECK(cuCtxSynchronize());
    printf("launch ns_per_launch=%.1f\n", (now() - t0) * 1e9 / n);
    return 0;
  }

  if (!strcmp(argv[1], "quota") && argc > 3) {
    double seconds = atof(argv[2]), us = atof(argv[3]);
    /* Calibrate: cycles for `us` microseconds, timed with events. */
    CUevent e0, e1;
    CHECK(cuEventCreate(&e0, 0));
    CHECK(cuEventCreate(&e1, 0));
    unsigned long long cycles = 1000000;
    float ms = 0;
    void *args[] = {&cycles};
    for (int k = 0; k < 3; k++) {
      CHECK(cuEventRecord(e0, 0));
      CHECK(cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, 0, args, 0));
      CHECK(cuEventRecord(e1, 0));
      CHECK(cuEventSynchronize(e1));
      CHECK(cuEventElapsedTime(&ms, e0, e1));
    }
    double per_ms = cycles / ms;
    cycles = (unsigned long long)(per_ms * us / 1000.0);
    /* Measure one kernel of the calibrated length. */
    CHECK(cuEventRecord(e0, 0));
    CHECK(cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, 0, args, 0));
    CHECK(cuEventRecord(e1, 0));
    CHECK(cuEventSynchronize(e1));
    CHECK(cuEventElapsedTime(&ms, e0, e1));
    double kernel_s = ms / 1000.0;
    /* Steady stream, synchronising every 8 launches like a training loop. */
    long n = 0;
    double t0 = now();
    while (now() - t0 < seconds) {
      CHECK(cuLaunchKernel(spin, 1, 1, 1, 1, 1, 1, 0, 0, args, 0));
      if (++n % 8 == 0) CHECK(cuCtxSynchronize());
    }
    CHECK(cuCtxSynchronize());
    double wall = now() - t0;
    printf("quota share=%.1f kernels=%ld kernel_us=%.1f wall_s=%.2f\n", 100.0 * n * kernel_s / wall, n,
           kernel_s * 1e6, wall);
    return 0;
  }
  fprintf(stderr, "unknown mode %s\n", argv[1]);
  return 2;
}
