#pragma once

#include <string>
#include <vector>

// "a", "b" -> "== A B ==".
std::string banner(const std::vector<std::string>& words);
