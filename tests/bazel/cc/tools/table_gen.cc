#include <cstdio>
#include <cstdlib>

// Writes a C++ source file defining squares[] for 0..n-1.
int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: table_gen N OUT\n");
    return 2;
  }
  int n = std::atoi(argv[1]);
  FILE* out = std::fopen(argv[2], "w");
  if (!out) return 1;
  std::fprintf(out, "#include \"gen/squares.h\"\n\nconst int squares[] = {");
  for (int i = 0; i < n; ++i) std::fprintf(out, "%s%d", i ? ", " : "", i * i);
  std::fprintf(out, "};\nconst int squares_count = %d;\n", n);
  return std::fclose(out) == 0 ? 0 : 1;
}
