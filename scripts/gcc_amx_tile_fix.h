/* Force-included (-include) into the llama.cpp build by scripts/llama_wheel.sh.
 *
 * GCC 12 (Debian 12's compiler) declares the memory operand of _tile_loadconfig as 8 bytes
 * (`"m" (*((const void **)__config))`), so the optimiser removes the stores to the rest of the
 * 64-byte AMX tile configuration as dead. llama.cpp's AMX kernels then run `ldtilecfg` on a
 * configuration whose rows and column widths are stack garbage: #GP, which Linux delivers as
 * SIGSEGV in the first llama_decode on a CPU with AMX (Intel Sapphire Rapids and later) whenever
 * the model's weights are in the AMX buffer type (llama.cpp's default "extra buffer types").
 * This macro declares all 64 bytes as read, so the stores stay. Harmless where AMX is unused. */
#include <immintrin.h>
#if defined(__AMX_TILE__) && defined(__GNUC__) && !defined(__clang__)
#define _tile_loadconfig(config) \
  __asm__ volatile ("ldtilecfg\t%0" :: "m" (*(const unsigned char (*)[64])(config)))
#endif
