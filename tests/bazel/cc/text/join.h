#pragma once

#include <string>
#include <vector>

std::string join(const std::vector<std::string>& parts, const std::string& separator);
