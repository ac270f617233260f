/* y = x W^T for a pruned matrix W in compact CSR: 16-bit columns and the export's non-zeros.
 *
 * Layout (elsa/model_io/compact_linear.py builds it from the export's bitmask and values):
 *   row_start  int64, rows + 1: row r's non-zeros are entries row_start[r] .. row_start[r + 1] - 1;
 *   col        uint16, nnz: the column of each non-zero, ascending within a row (cols <= 65536);
 *   values     nnz, bf16 (raw uint16) or fp32: the export's non-zeros in row-major order, unchanged.
 * 4 bytes a non-zero for bf16 values (0.4 bytes a matrix entry at 90% sparsity), against 8 for the
 * int32 / fp32 CSR that MKL's product needs and 2 an entry for dense bf16.
 *
 * x is fp32. One token (decoding): each row is one dot product over its non-zeros, which the
 * compiler vectorises (omp simd; the sum's order is the vector lanes', within fp32 rounding of
 * the sequential one). Several tokens (a prompt): x is given transposed, cols x tokens, so each
 * non-zero scales one contiguous row of it; y is tokens x rows either way. Rows are split over the
 * OpenMP threads of the runtime torch has already loaded (libgomp.so.1, found by its soname).
 */
#include <stdint.h>
#include <string.h>

#define TOKEN_CHUNK 32

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
            float acc = 0.0f;                                                                     \
            const int64_t end = row_start[r + 1];                                                 \
            _Pragma("omp simd reduction(+ : acc)")                                                \
            for (int64_t k = row_start[r]; k < end; k++) acc += LOAD(values[k]) * x[col[k]];      \
            y[r] = acc;                                                                           \
        }                                                                                         \
    }                                                                                             \
                                                                                                  \
    void elsa_csr16_matmul_##SUFFIX(int64_t rows, const int64_t *row_start, const uint16_t *col,  \
                                    const VALUE_T *values, const float *xt, int64_t tokens,       \
                                    float *y) {                                                   \
        _Pragma("omp parallel for schedule(static)")                                              \
        for (int64_t r = 0; r < rows; r++) {                                                      \
            for (int64_t t0 = 0; t0 < tokens; t0 += TOKEN_CHUNK) {                                \
                const int64_t n = tokens - t0 < TOKEN_CHUNK ? tokens - t0 : TOKEN_CHUNK;          \
                float acc[TOKEN_CHUNK] = {0.0f};                                                  \
                for (int64_t k = row_start[r]; k < row_start[r + 1]; k++) {                       \
                    const float value = LOAD(values[k]);                                          \
                    const float *xc = xt + (int64_t)col[k] * tokens + t0;                         \
                    for (int64_t t = 0; t < n; t++) acc[t] += value * xc[t];                      \
                }                                                                                 \
                for (int64_t t = 0; t < n; t++) y[(t0 + t) * rows + r] = acc[t];                  \
            }                                                                                     \
        }                                                                                         \
    }

#define LOAD_BF16(v) bf16_to_float(v)
#define LOAD_F32(v) (v)

DEFINE_KERNELS(bf16, uint16_t, LOAD_BF16)
DEFINE_KERNELS(f32, float, LOAD_F32)
