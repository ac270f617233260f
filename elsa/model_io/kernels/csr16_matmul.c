/* y = x W^T for a pruned matrix W in compact CSR: 16-bit columns and the export's non-zeros.
 *
 * Layout (elsa/model_io/compact_linear.py builds it from the export's bitmask and values):
 *   row_start  int64, rows + 1: row r's non-zeros are entries row_start[r] .. row_start[r + 1] - 1;
 *   col        uint16, nnz: the column of each non-zero, ascending within a row (cols <= 65536);
 *   values     nnz, bf16 (raw uint16) or fp32: the export's non-zeros in row-major order, unchanged.
 * 4 bytes a non-zero for bf16 values (0.4 bytes a matrix entry at 90% sparsity), against 8 for the
 * int32 / fp32 CSR that MKL's product needs and 2 an entry for dense bf16.
 *
 * x is fp32. One token (decoding): each row is one dot product over its non-zeros, eight at a
 * time: the eight x entries are loaded one by one (gathers are slow on some CPUs) into a vector
 * and multiplied with the eight values in one instruction, eight running sums added at the row's
 * end (the order of the sum differs from the sequential one within fp32 rounding). Several tokens
 * (a prompt): x is given transposed, cols x stride (tokens padded with zeros to whole vectors),
 * so each non-zero scales one vector of it per 16 tokens; y is tokens x rows either way. Rows are
 * split over the OpenMP threads of the runtime torch has already loaded (libgomp.so.1, found by
 * its soname).
 */
#include <stdint.h>
#include <string.h>

/* tokens a prompt product handles at once: one vector of floats (AVX-512: one register) */
#define LANES 16
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef float vfloat8 __attribute__((vector_size(8 * sizeof(float))));

static inline float bf16_to_float(uint16_t raw) {
    uint32_t bits = (uint32_t)raw << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

#define DEFINE_KERNELS(SUFFIX, VALUE_T, LOAD)                                                      \
    void elsa_csr16_matvec_##SUFFIX(int64_t rows, const int64_t *row_start, const uint16_t *col,  \
                                    const VALUE_T *values, const float *x, float *y) {            \
        _Pragma("omp parallel for schedule(static)")                                              \
        for (int64_t r = 0; r < rows; r++) {                                                      \
            vfloat8 acc = {0.0f};                                                                 \
            float tail = 0.0f;                                                                    \
            int64_t k = row_start[r];                                                             \
            const int64_t end = row_start[r + 1];                                                 \
            for (; k + 8 <= end; k += 8) {                                                        \
                const vfloat8 xs = {x[col[k]],     x[col[k + 1]], x[col[k + 2]], x[col[k + 3]],   \
                                    x[col[k + 4]], x[col[k + 5]], x[col[k + 6]], x[col[k + 7]]};  \
                const vfloat8 vs = {LOAD(values[k]),     LOAD(values[k + 1]),                     \
                                    LOAD(values[k + 2]), LOAD(values[k + 3]),                     \
                                    LOAD(values[k + 4]), LOAD(values[k + 5]),                     \
                                    LOAD(values[k + 6]), LOAD(values[k + 7])};                    \
                acc += vs * xs;                                                                   \
            }                                                                                     \
            for (; k < end; k++) tail += LOAD(values[k]) * x[col[k]];                             \
            y[r] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) \
                   + tail;                                                                        \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    void elsa_csr16_matmul_##SUFFIX(int64_t rows, const int64_t *row_start, const uint16_t *col,  \
                                    const VALUE_T *values, const float *xt, int64_t stride,       \
                                    int64_t tokens, float *y) {                                   \
        _Pragma("omp parallel for schedule(static)")                                              \
        for (int64_t r = 0; r < rows; r++) {                                                      \
            const int64_t begin = row_start[r], end = row_start[r + 1];                           \
            for (int64_t t0 = 0; t0 < tokens; t0 += LANES) {                                      \
                vfloat acc = {0.0f};                                                              \
                for (int64_t k = begin; k < end; k++) {                                           \
                    vfloat xs;                                                                    \
                    memcpy(&xs, xt + (int64_t)col[k] * stride + t0, sizeof xs);                   \
                    acc += LOAD(values[k]) * xs;                                                  \
                }                                                                                 \
                const int64_t n = tokens - t0 < LANES ? tokens - t0 : LANES;                      \
                for (int64_t t = 0; t < n; t++) y[(t0 + t) * rows + r] = acc[t];                  \
            }                                                                                     \
        }                                                                                         \
    }

#define LOAD_BF16(v) bf16_to_float(v)
#define LOAD_F32(v) (v)

DEFINE_KERNELS(bf16, uint16_t, LOAD_BF16)
DEFINE_KERNELS(f32, float, LOAD_F32)
