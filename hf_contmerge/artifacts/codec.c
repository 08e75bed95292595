/* The low-bits codec of compact.py in one pass over memory each way (artifacts/native.py builds and loads it).

   torch has no fused kernel for these bit operations: in eager torch, encoding is five passes (round, finite
   check, the low half, the tie compare, packing the ties) and decoding four more (unpacking the ties, widening,
   shift, add), each a full read and write of the slice; the palette coding of the codes (state format 5) is a
   histogram, a sort and two gathers. The functions here compute the same bytes as those torch ops
   (tests/artifacts/test_native.py checks them against each other): C99 with one GCC/Clang attribute (an
   alignment), no intrinsics, so the compiler vectorises what it can for the machine it is built on.

   bfloat16 rounding is round-to-nearest-even on the bit pattern, as c10::BFloat16 does it. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
        uint32_t ties_here = 0;
        for (int64_t i = 0; i < m; i++) { /* vectorised: no branch, no cross-element dependency */
            uint32_t b = s[i];
            uint32_t p = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
            bad |= ((b & 0x7F800000u) == 0x7F800000u) | ((p & 0x7F80u) == 0x7F80u);
            p16[i] = (uint16_t)p;
            l16[i] = (uint16_t)b;
            flag[i] = (uint8_t)(b == (p << 16) + 0x8000u); /* kept the high half on an exact tie */
            ties_here += flag[i]; /* not __builtin_popcount below: a libgcc call without -mpopcnt */
        }
        count += ties_here;
        for (int64_t i = m; i < ((m + 7) & ~(int64_t)7); i++)
            flag[i] = 0;
        for (int64_t w = 0; w < (m + 7) / 8; w++) {
            /* 8 flags (0/1) as one little-endian word: the multiply moves flag k to bit 56 + k, and no partial
               product carries into the top byte (compact._GATHER) */
            uint64_t x = 0;
            for (int k = 0; k < 8; k++)
                x |= (uint64_t)flag[8 * w + k] << (8 * k);
            ties[a / 8 + w] = (uint8_t)((x * 0x0102040810204080ull) >> 56);
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

/* The palette of the int16 codes (state format 5, compact.py): the 255 codes most frequent in a block (counted
   on every stride-th code, stride = max(1, n >> 18)), most frequent first, equal counts in ascending code
   order, and zero-count codes after all others in ascending order (the order of a stable sort by descending
   count of the 65536 codes, which compact.py's torch path takes). Then each code as its index in the palette,
   PAL_ESCAPE for the codes outside it, whose values go to esc in order. Returns the number of escapes, or -1
   when out of memory. */
#define PAL_SIZE 255
#define PAL_ESCAPE 255
#define PAL_SAMPLE_LOG 18 /* compact.PALETTE_SAMPLE_LOG */

typedef struct { uint32_t count; uint32_t code; } pal_entry; /* code: int16 value + 32768 */

/* a worse than b: fewer occurrences, or as many and a higher code */
static int pal_worse(pal_entry a, pal_entry b) { return a.count < b.count || (a.count == b.count && a.code > b.code); }

static void pal_sift_down(pal_entry *h, int n, int i) { /* a heap with the worst entry on top */
    for (;;) {
        int w = i, l = 2 * i + 1, r = l + 1;
        if (l < n && pal_worse(h[l], h[w])) w = l;
        if (r < n && pal_worse(h[r], h[w])) w = r;
        if (w == i) return;
        pal_entry t = h[i]; h[i] = h[w]; h[w] = t;
        i = w;
    }
}

int64_t cm_palette(const int16_t *restrict codes, int64_t n, void *restrict table_out, uint8_t *restrict ranks,
                   int16_t *restrict esc) {
    int16_t table[PAL_SIZE]; /* table_out: 2 * PAL_SIZE bytes, of any alignment (they precede the indices) */
    uint32_t *counts = calloc(65536, sizeof(uint32_t));
    uint8_t *lut = malloc(65536);
    if (!counts || !lut) { free(counts); free(lut); return -1; }
    /* counted on every stride-th code: the palette only decides the frame's size, never its content, and a
       sample of 2^18 codes ranks the frequent ones as the whole block does at a sixteenth of the cost (the
       counts of one code in a row also stall on each other) */
    int64_t stride = n >> PAL_SAMPLE_LOG > 1 ? n >> PAL_SAMPLE_LOG : 1;
    for (int64_t i = 0; i < n; i += stride)
        counts[(uint16_t)(codes[i] + 32768)]++;
    /* the best PAL_SIZE codes, scanning in ascending order: a code replaces the heap's worst only when better */
    pal_entry heap[PAL_SIZE];
    for (int v = 0; v < PAL_SIZE; v++)
        heap[v] = (pal_entry){counts[v], (uint32_t)v};
    for (int i = PAL_SIZE / 2 - 1; i >= 0; i--)
        pal_sift_down(heap, PAL_SIZE, i);
    for (uint32_t v = PAL_SIZE; v < 65536; v++) {
        pal_entry e = {counts[v], v};
        if (pal_worse(heap[0], e)) { heap[0] = e; pal_sift_down(heap, PAL_SIZE, 0); }
    }
    /* best first: popping the worst fills the table from its end */
    for (int k = PAL_SIZE - 1; k >= 0; k--) {
        table[k] = (int16_t)((int32_t)heap[0].code - 32768);
        heap[0] = heap[k];
        pal_sift_down(heap, k, 0);
    }
    memcpy(table_out, table, sizeof table);
    memset(lut, PAL_ESCAPE, 65536);
    for (int k = 0; k < PAL_SIZE; k++)
        lut[(uint16_t)(table[k] + 32768)] = (uint8_t)k;
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) { /* no branch: esc[m] is overwritten until an escape keeps it (m <= i) */
        uint8_t r = lut[(uint16_t)(codes[i] + 32768)];
        ranks[i] = r;
        esc[m] = codes[i];
        m += r == PAL_ESCAPE;
    }
    free(counts);
    free(lut);
    return m;
}

/* The n codes back from their palette indices, the table and the n_esc escaped codes in order. Returns the
   number of escapes the indices call for (the caller refuses a block where it differs from n_esc); reads no
   more than n_esc of them. */
int64_t cm_unpalette(const uint8_t *restrict ranks, int64_t n, const int16_t *restrict table,
                     const int16_t *restrict esc, int64_t n_esc, int16_t *restrict codes) {
    int16_t full[256];
    memcpy(full, table, PAL_SIZE * sizeof(int16_t));
    full[PAL_ESCAPE] = 0;
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        uint8_t r = ranks[i];
        codes[i] = full[r];
        if (r == PAL_ESCAPE) {
            codes[i] = m < n_esc ? esc[m] : 0;
            m++;
        }
    }
    return m;
}
