// File-driven host emulation of the SGMV kernels (see emulate.h), linked with
// emulate_lib.cpp and built with AddressSanitizer + UBSan, so that an out-of-bounds global
// read or write aborts the run.
//
// Usage: lk_emulate DIR   (DIR/meta.txt holds "key value" lines, DIR/<name>.bin the raw
// arrays; writes DIR/t_out.bin and DIR/y_out.bin). Driven by tests/test_cuda_build.py.
#include <map>

#include "emulate.h"

namespace {

using lk_emu::die;

struct Dir {
  std::string path;
  std::map<std::string, int64_t> meta;

  int64_t get(const std::string& k) const {
    auto it = meta.find(k);
    if (it == meta.end()) die("meta.txt lacks " + k);
    return it->second;
  }
  // Exactly as many elements as the file holds, so ASan sees every overrun.
  template <class T>
  std::vector<T> read(const std::string& name) const {
    const std::string f = path + "/" + name + ".bin";
    FILE* fp = fopen(f.c_str(), "rb");
    if (!fp) die("cannot open " + f);
    fseek(fp, 0, SEEK_END);
    const long bytes = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    std::vector<T> v(static_cast<size_t>(bytes) / sizeof(T));
    if (!v.empty() && fread(v.data(), sizeof(T), v.size(), fp) != v.size()) die("short " + f);
    fclose(fp);
    return v;
  }
  template <class T>
  void write(const std::string& name, const std::vector<T>& v) const {
    const std::string f = path + "/" + name + ".bin";
    FILE* fp = fopen(f.c_str(), "wb");
    if (!fp || fwrite(v.data(), sizeof(T), v.size(), fp) != v.size()) die("cannot write " + f);
    fclose(fp);
  }
};

size_t elem_size(int64_t dtype) { return dtype == LK_FLOAT32 ? 4 : 2; }

// Drives the C ABI exactly as lorakernels/kernels/cuda.py does, on exactly-sized host
// buffers (ASan flags any overrun). t and y_out start as NaN so unwritten elements show.
void run_all(const Dir& d) {
  const auto dtype = static_cast<lk_dtype>(d.get("dtype"));
  const auto x = d.read<uint8_t>("x");
  const auto lora_a = d.read<uint8_t>("lora_a");
  const auto lora_bt = d.read<uint8_t>("lora_bt");
  const auto y_in = d.read<uint8_t>("y_in");
  const auto slot_start = d.read<int32_t>("slot_start");
  const auto slot_rank = d.read<int32_t>("slot_rank");
  const auto slot_scale = d.read<float>("slot_scale");
  const auto row_ptr = d.read<int32_t>("row_ptr");
  const auto entry_ptr = d.read<int32_t>("entry_ptr");
  const auto entry_slot = d.read<int32_t>("entry_slot");
  const auto entry_weight = d.read<float>("entry_weight");
  std::vector<float> t(static_cast<size_t>(d.get("t_numel")), NAN);
  std::vector<uint8_t> y_out(static_cast<size_t>(d.get("y_out_numel")) * elem_size(dtype), 0xff);
  const int64_t S = d.get("S"), L = d.get("L"), R = d.get("R");
  const int64_t max_rows = d.get("max_rows"), max_entries = d.get("max_entries");
  const int64_t max_rank = d.get("max_rank");
  lk_status st = lk_sgmv_shrink(dtype, x.data(), d.get("ldx"), lora_a.data(), d.get("lda"),
                                t.data(), d.get("ldt"), slot_start.data(), slot_rank.data(),
                                row_ptr.data(), entry_ptr.data(), entry_slot.data(), S, L, R,
                                d.get("K"), max_rows, max_entries, max_rank, nullptr);
  if (st != LK_OK) die(std::string("lk_sgmv_shrink: ") + lk_last_error());
  d.write("t_out", t);
  const lk_dtype y_in_dtype = d.get("y_in_f32") ? LK_FLOAT32 : dtype;
  st = lk_sgmv_expand(dtype, y_in_dtype, y_in.data(), d.get("ldyi"), y_out.data(), d.get("ldyo"),
                      t.data(), d.get("ldt"), lora_bt.data(), d.get("ldb"), slot_start.data(),
                      slot_rank.data(), slot_scale.data(), row_ptr.data(), entry_ptr.data(),
                      entry_slot.data(), entry_weight.data(), S, L, R, d.get("N"), max_rows,
                      max_entries, max_rank, nullptr);
  if (st != LK_OK) die(std::string("lk_sgmv_expand: ") + lk_last_error());
  d.write("y_out", y_out);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) die("usage: lk_emulate DIR");
  Dir d{argv[1], {}};
  FILE* fp = fopen((d.path + "/meta.txt").c_str(), "r");
  if (!fp) die("cannot open meta.txt");
  char key[64];
  long long value;
  while (fscanf(fp, "%63s %lld", key, &value) == 2) d.meta[key] = value;
  fclose(fp);
  run_all(d);
  return 0;
}
