/* The low-bits codec of compact.py in one pass over memory each way (artifacts/native.py builds and loads it).

   torch has no fused kernel for these bit operations: in eager torch, encoding is five passes (round, finite
   check, the low half, the tie compare, packing the ties) and decoding four more (unpacking the ties, widening,
   shift, add), each a full read and write of the slice. Both functions here compute the same bits as those
   torch passes (tests/artifacts/test_native.py checks them against each other): C99 with two GCC/Clang
   builtins (popcount, alignment), no intrinsics, so the compiler vectorises it for the machine it is built on.

   bfloat16 rounding is round-to-nearest-even on the bit pattern, as c10::BFloat16 does it. */

#include <stdint.h>

#define BLOCK 256 /* elements whose tie flags are gathered before packing: a multiple of 8, in L1 */

/* state: n float32 bit patterns. Writes pub (the bfloat16 rounding), low (the low half of each pattern, the
   int16 code) and ties (bit i of byte j: element 8j + i of the slice is a tie rounded down; ceil(n / 8) bytes,
   the last one zero-padded). Returns the number of ties, or -1 when a value is not finite or rounds to an
   infinity (the caller reports which). */
int64_t cm_encode(const uint32_t *restrict state, int64_t n, uint16_t *restrict pub, uint16_t *restrict low,
                  uint8_t *restrict ties) {
    int64_t count = 0;
    uint32_t bad = 0;
    uint8_t flag[BLOCK] __attribute__((aligned(64)));
    for (int64_t a = 0; a < n; a += BLOCK) {
        int64_t m = n - a < BLOCK ? n - a : BLOCK;
        const uint32_t *s = state + a;
        uint16_t *p16 = pub + a, *l16 = low + a;
        for (int64_t i = 0; i < m; i++) { /* vectorised: no branch, no cross-element dependency */
            uint32_t b = s[i];
            uint32_t p = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
            bad |= ((b & 0x7F800000u) == 0x7F800000u) | ((p & 0x7F80u) == 0x7F80u);
            p16[i] = (uint16_t)p;
            l16[i] = (uint16_t)b;
            flag[i] = (uint8_t)(b == (p << 16) + 0x8000u); /* kept the high half on an exact tie */
        }
        for (int64_t i = m; i < ((m + 7) & ~(int64_t)7); i++)
            flag[i] = 0;
        for (int64_t w = 0; w < (m + 7) / 8; w++) {
            /* 8 flags (0/1) as one little-endian word: the multiply moves flag k to bit 56 + k, and no partial
               product carries into the top byte (compact._GATHER) */
            uint64_t x = 0;
            for (int k = 0; k < 8; k++)
                x |= (uint64_t)flag[8 * w + k] << (8 * k);
            uint8_t byte = (uint8_t)((x * 0x0102040810204080ull) >> 56);
            ties[a / 8 + w] = byte;
            count += __builtin_popcount(byte);
        }
    }
    return bad ? -1 : count;
}

/* The float32 bit patterns of n elements from their bfloat16 pub, int16 low and the ties rounded down: bit
   (bitoff + i) of the bitmask ties marks element i (ties may be NULL: none; the caller adds sparse ones). */
void cm_decode(const uint16_t *restrict pub, const int16_t *restrict low, const uint8_t *restrict ties,
               int64_t bitoff, int64_t n, uint32_t *restrict out) {
    if (ties == 0) {
        for (int64_t i = 0; i < n; i++)
            out[i] = ((uint32_t)pub[i] << 16) + (uint32_t)(int32_t)low[i];
        return;
    }
    int64_t i = 0;
    for (; i < n && ((bitoff + i) & 7); i++) /* up to the bitmask's next whole byte */
        out[i] = (((uint32_t)pub[i] + ((ties[(bitoff + i) >> 3] >> ((bitoff + i) & 7)) & 1u)) << 16)
                 + (uint32_t)(int32_t)low[i];
    const uint8_t *t = ties + ((bitoff + i) >> 3);
    for (; i + 8 <= n; i += 8, t++) {
        uint32_t byte = *t;
        for (int k = 0; k < 8; k++)
            out[i + k] = (((uint32_t)pub[i + k] + ((byte >> k) & 1u)) << 16) + (uint32_t)(int32_t)low[i + k];
    }
    for (int k = 0; i < n; i++, k++)
        out[i] = (((uint32_t)pub[i] + ((*t >> k) & 1u)) << 16) + (uint32_t)(int32_t)low[i];
}
