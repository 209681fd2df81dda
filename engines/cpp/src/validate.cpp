// See validate.hpp.  Mirrors engines/validate.py rule for rule: change both together (the shared
// bad-bundle corpus in tests/bad_bundles.py runs through both readers).  This file holds the first
// layer, the document's rules (document_problem); the files and the graph files are checked in
// validate_files.cpp.
#include "validate.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

namespace rstr::validate {
namespace {

using json = nlohmann::json;
using Problem = std::optional<std::string>;

const char* const kGraphs[] = {"denoiser", "step_guided", "step_single"};
const std::set<std::string> kScalars = {"scale", "coef_sample", "coef_eps"};

std::string num(const json& v) { return v.dump(); }

bool finite(const json& v) { return v.is_number() && std::isfinite(v.get<double>()); }

/// A step's coef_sample or coef_eps as a list: one number, or [current, previous, ...].
json coefficients(const json& v) { return v.is_array() ? v : json::array({v}); }

/// The past steps a plan's updates read: the longest coefficient list less one (0 for one-step schedulers).
uint64_t plan_history(const json& plan) {
  uint64_t k = 0;
  for (const auto& step : plan.at("steps"))
    for (const char* key : {"coef_sample", "coef_eps"}) k = std::max<uint64_t>(k, coefficients(step.at(key)).size() - 1);
  return k;
}

/// a * b, saturating at UINT64_MAX.
uint64_t mul(uint64_t a, uint64_t b) {
  if (a != 0 && b > UINT64_MAX / a) return UINT64_MAX;
  return a * b;
}

Problem tensor_problem(const std::string& at, const json& desc, uint64_t batch) {
  const json& shape = desc.at("shape");
  for (size_t i = 1; i < shape.size(); ++i)
    if (shape[i].is_string())
      return at + ".shape[" + std::to_string(i) + "] is \"" + shape[i].get<std::string>() +
             "\"; only axis 0 (the batch) may be symbolic";
  const uint64_t rows = shape[0].is_string() ? mul(2, batch) : u64(shape[0]);
  uint64_t count = rows;
  for (size_t i = 1; i < shape.size(); ++i) count = mul(count, u64(shape[i]));
  if (count > kMaxElements)
    return at + ".shape " + shape_text(shape) + " has more than " + std::to_string(kMaxElements) + " elements at " +
           std::to_string(rows) + " rows";
  return std::nullopt;
}

Problem sample_rule(const json& m) {
  const json& sample = m.at("sample");
  const json& shape = sample.at("shape");
  const uint64_t batch = u64(m.at("batch"));
  if (sample.at("dtype") != "float32")
    return "sample.dtype is \"" + sample.at("dtype").get<std::string>() + "\"; the latents are float32";
  if (!is_int(shape[0]) || u64(shape[0]) != batch)
    return "sample.shape " + shape_text(shape) + " must start with the batch, " + std::to_string(batch);
  return tensor_problem("sample", sample, batch);
}

Problem conditioning_rule(const json& m) {
  const json& cond = m.at("conditioning");
  const uint64_t batch = u64(m.at("batch"));
  const json* num_classes = cond.contains("num_classes") && !cond.at("num_classes").is_null() ? &cond.at("num_classes") : nullptr;
  const json& inputs = cond.at("inputs");
  for (size_t i = 0; i < inputs.size(); ++i) {
    const json& desc = inputs[i];
    const std::string at = "conditioning.inputs[" + std::to_string(i) + "]";
    const json& first = desc.at("shape")[0];
    if (is_int(first) && u64(first) != batch)
      return at + ".shape starts with " + num(first) + " but the bundle's batch is " + std::to_string(batch);
    if (auto p = tensor_problem(at, desc, batch)) return p;
    const std::string name = desc.at("name").get<std::string>();
    const json& rules = cond.at("unconditional");
    if (!rules.contains(name))
      return "conditioning.unconditional has no rule for input '" + name + "'; give {\"fill\": value} or \"required\"";
    const json& rule = rules.at(name);
    if (!rule.is_object()) continue;
    const json& fill = rule.at("fill");
    const std::string fat = "conditioning.unconditional." + name + ".fill";
    if (!finite(fill)) return fat + " is not a finite number";
    const double f = fill.get<double>();
    const bool int64 = desc.at("dtype") == "int64";
    if (int64 && std::floor(f) != f) return fat + " must be an integer ('" + name + "' is int64)";
    if (int64 && num_classes && !(f >= 0 && f <= num_classes->get<double>()))
      return fat + " must be a class in 0.." + num(*num_classes) + " (the null class is usually " + num(*num_classes) + ")";
  }
  return std::nullopt;
}

Problem plan_rule(const json& m) {
  const json& plan = m.at("plan");
  const uint64_t batch = u64(m.at("batch"));
  for (const char* key : {"init_noise_sigma", "compute_fraction"})
    if (!finite(plan.at(key))) return std::string("plan.") + key + " is not a finite number";
  const json& steps = plan.at("steps");
  uint64_t guided_steps = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    const json& step = steps[i];
    const std::string at = "plan.steps[" + std::to_string(i) + "]";
    if (u64(step.at("index")) != i) return at + ".index is " + num(step.at("index")) + "; steps are listed in order from 0";
    for (const char* key : {"timestep", "model_timestep", "coef_sample", "coef_eps", "scale"}) {
      const json values = std::string(key).rfind("coef", 0) == 0 ? coefficients(step.at(key)) : json::array({step.at(key)});
      for (const auto& v : values)
        if (!v.is_null() && !finite(v)) return at + "." + key + " is not a finite number";
    }
    const bool guided = step.at("guided").get<bool>();
    guided_steps += guided;
    if (guided && step.at("scale").is_null())
      return at + ".scale is null on a guided step; a guided step needs its guidance scale";
    if (!guided && !step.at("scale").is_null())
      return at + ".scale is set on an unguided step; an unguided step takes none (null)";
    const uint64_t rows = guided ? mul(2, batch) : batch;
    if (u64(step.at("batch")) != rows)
      return at + ".batch is " + num(step.at("batch")) + " but " + (guided ? "a guided" : "an unguided") + " step runs " +
             std::to_string(rows) + " rows at batch " + std::to_string(batch);
  }
  const std::pair<const char*, uint64_t> counts[] = {{"num_steps", steps.size()},
                                                      {"passes_per_image", steps.size() + guided_steps}};
  for (const auto& [key, value] : counts)
    if (u64(plan.at(key)) != value)
      return std::string("plan.") + key + " is " + num(plan.at(key)) + " but the steps give " + std::to_string(value);
  return std::nullopt;
}

Problem decoder_rule(const json& m) {
  if (!m.contains("decoder") || m.at("decoder").is_null()) return std::nullopt;
  const json& range = m.at("decoder").at("range");
  if (!(finite(range[0]) && finite(range[1]) && range[0].get<double>() < range[1].get<double>()))
    return "decoder.range must be two finite numbers [lo, hi] with lo < hi";
  const json& d = m.at("decoder");
  if (d.at("kind") == "pixels") {
    const json& shape = m.at("sample").at("shape");
    const json rest(shape.begin() + 1, shape.end());
    const int64_t c = d.at("channels").get<int64_t>(), s = d.at("size").get<int64_t>();
    if (rest != json::array({c, s, s}) && !(s % 2 == 0 && rest == json::array({s * s / 4, 4 * c})))
      return "a pixels decoder of " + std::to_string(c) + " x " + std::to_string(s) + " x " + std::to_string(s) +
             " images needs samples [" + std::to_string(c) + ", " + std::to_string(s) + ", " + std::to_string(s) +
             "] or, 2x2-packed, [" + std::to_string(s * s / 4) + ", " + std::to_string(4 * c) + "]; sample.shape is " +
             shape_text(shape);
  }
  return std::nullopt;
}

/// (dtype, dimensions past axis 0) the runtime binds.
struct Wanted {
  std::string dtype;
  json rest;
};

Problem graphs_rule(const json& m) {
  const uint64_t batch = u64(m.at("batch"));
  const json& cond = m.at("conditioning").at("inputs");
  const json sample_rest(m.at("sample").at("shape").begin() + 1, m.at("sample").at("shape").end());
  std::vector<std::string> cond_names;
  std::map<std::string, Wanted> cond_wanted;
  for (const auto& d : cond) {
    cond_names.push_back(d.at("name").get<std::string>());
    cond_wanted[cond_names.back()] = Wanted{d.at("dtype").get<std::string>(), json(d.at("shape").begin() + 1, d.at("shape").end())};
  }
  Wanted out{"float32", json::array()};
  const uint64_t k = plan_history(m.at("plan"));
  json past_rest = json::array({k, 2});  // history [rows, k, 2, ...]: past (sample, model output) pairs
  past_rest.insert(past_rest.end(), sample_rest.begin(), sample_rest.end());
  for (const char* name : kGraphs) {
    const std::string g = name;
    const json& graph = m.at("graphs").at(g);
    std::vector<std::string> expected_in, expected_out = {"next_sample", "next_sample_pair"};
    if (g == "denoiser") {
      expected_in = {"sample", "timestep"};
      expected_in.insert(expected_in.end(), cond_names.begin(), cond_names.end());
      expected_out = {"model_output"};
    } else if (g == "step_guided") {
      expected_in = {"sample", "model_output", "scale", "coef_sample", "coef_eps"};
    } else {
      expected_in = {"sample", "model_output", "coef_sample", "coef_eps"};
    }
    if (g != "denoiser" && k > 0) {
      expected_in.push_back("history");
      expected_out.push_back("next_history");
    }
    const std::pair<const char*, const std::vector<std::string>*> kinds[] = {{"inputs", &expected_in},
                                                                             {"outputs", &expected_out}};
    for (const auto& [kind, expected] : kinds) {
      const json& descs = graph.at(kind);
      std::vector<std::string> names;
      for (size_t i = 0; i < descs.size(); ++i) {
        if (auto p = tensor_problem("graphs." + g + "." + kind + "[" + std::to_string(i) + "]", descs[i], batch)) return p;
        names.push_back(descs[i].at("name").get<std::string>());
      }
      std::vector<std::string> sorted_names = names, sorted_expected = *expected;
      std::sort(sorted_names.begin(), sorted_names.end());
      std::sort(sorted_expected.begin(), sorted_expected.end());
      auto twice = std::adjacent_find(sorted_names.begin(), sorted_names.end());
      if (twice != sorted_names.end()) return "graphs." + g + "." + kind + " names '" + *twice + "' twice";
      if (sorted_names != sorted_expected)
        return "graphs." + g + "." + kind + " are " + join_sorted(names) + "; the runtime binds " + join_sorted(*expected);
    }
    std::map<std::string, const json*> tensors;  // by name; an output replaces an input of the same name
    for (const char* kind : {"inputs", "outputs"})
      for (const auto& d : graph.at(kind)) tensors[d.at("name").get<std::string>()] = &d;
    std::map<std::string, Wanted> wanted;
    if (g == "denoiser") {
      const json& shape = tensors.at("model_output")->at("shape");
      out = Wanted{"float32", json(shape.begin() + 1, shape.end())};
      wanted = cond_wanted;
      wanted["sample"] = Wanted{"float32", sample_rest};
      wanted["timestep"] = Wanted{"float32", json::array()};
      wanted["model_output"] = out;
    } else {
      for (const char* t : {"sample", "next_sample", "next_sample_pair"}) wanted[t] = Wanted{"float32", sample_rest};
      wanted["model_output"] = out;
      for (const char* t : {"history", "next_history"}) wanted[t] = Wanted{"float32", past_rest};
    }
    for (const auto& [tensor, desc] : tensors) {
      const std::string dtype = desc->at("dtype").get<std::string>();
      const json& shape = desc->at("shape");
      const std::string lead = "graphs." + g + " tensor '" + tensor + "' is " + dtype + " " + shape_text(shape);
      if (kScalars.count(tensor)) {
        const uint64_t n = tensor == "scale" ? 1 : k + 1;
        if (dtype != "float32" || shape.size() != 1 || !is_int(shape[0]) || u64(shape[0]) != n)
          return lead + "; the runtime binds float32 [" + std::to_string(n) + "]";
        continue;
      }
      const Wanted& want = wanted.at(tensor);
      const json rest(shape.begin() + 1, shape.end());
      if (dtype != want.dtype || rest != want.rest) {
        json expected = json::array({"rows"});
        expected.insert(expected.end(), want.rest.begin(), want.rest.end());
        return lead + "; the runtime binds " + want.dtype + " " + shape_text(expected);
      }
    }
  }
  return std::nullopt;
}

bool is_plan_graph(const std::string& name) {
  return std::find(std::begin(kGraphs), std::end(kGraphs), name) != std::end(kGraphs);
}

/// The graphs beside the plan's, by name (sorted, as std::map and Python's sorted()).
std::vector<std::string> other_graph_names(const json& m) {
  std::vector<std::string> names;
  for (const auto& [name, _] : m.at("graphs").items())
    if (!is_plan_graph(name)) names.push_back(name);
  return names;
}

/// See _other_graphs in engines/validate.py: the decoder's, the text encoders' and the class table's graphs.
Problem other_graphs_rule(const json& m) {
  const json& graphs = m.at("graphs");
  const uint64_t batch = u64(m.at("batch"));
  const json* decoder = m.contains("decoder") && !m.at("decoder").is_null() ? &m.at("decoder") : nullptr;
  const json* encoders = m.contains("text") && !m.at("text").is_null() ? &m.at("text").at("encoders") : nullptr;
  const json* classes = m.contains("classes") && !m.at("classes").is_null() ? &m.at("classes") : nullptr;
  // Who runs each graph, in the order Python's graph_users() fills its dict.
  std::vector<std::pair<std::string, std::string>> users;
  const auto user_of = [&users](const std::string& graph) -> const std::string* {
    for (const auto& [g, u] : users)
      if (g == graph) return &u;
    return nullptr;
  };
  if (decoder && decoder->contains("graph")) users.emplace_back(decoder->at("graph").get<std::string>(), "decoder");
  for (size_t i = 0; encoders && i < encoders->size(); ++i) {
    const std::string graph = (*encoders)[i].at("graph").get<std::string>();
    if (!user_of(graph)) users.emplace_back(graph, "text.encoders[" + std::to_string(i) + "]");
  }
  if (classes && !user_of(classes->at("graph").get<std::string>()))
    users.emplace_back(classes->at("graph").get<std::string>(), "classes");
  if (decoder) {
    const std::string kind = decoder->at("kind").get<std::string>();
    if (kind == "vae" && !decoder->contains("graph")) return std::string("decoder.graph is missing; a vae decoder names its graph");
    if (kind != "vae" && decoder->contains("graph"))
      return "decoder.graph is set on a \"" + kind + "\" decoder; only a vae decoder runs a graph";
  }
  for (const auto& [graph, user] : users)
    if (is_plan_graph(graph) || !graphs.contains(graph))
      return user + ".graph '" + graph + "' is not one of the graphs beside the plan's";

  std::map<std::string, const json*> cond;
  for (const auto& d : m.at("conditioning").at("inputs")) cond[d.at("name").get<std::string>()] = &d;
  const auto rest_of = [](const json& shape) { return json(shape.begin() + 1, shape.end()); };
  std::map<std::string, std::map<std::string, Wanted>> wanted;  // graph: tensor: (dtype, dims past axis 0; null: [H, W, C])
  if (decoder && decoder->contains("graph"))
    wanted[decoder->at("graph").get<std::string>()] = {{"latents", Wanted{"float32", rest_of(m.at("sample").at("shape"))}},
                                                        {"images", Wanted{"float32", json()}}};
  for (size_t i = 0; encoders && i < encoders->size(); ++i) {
    const json& e = (*encoders)[i];
    const std::string at = "text.encoders[" + std::to_string(i) + "]";
    const std::string graph = e.at("graph").get<std::string>();
    if (*user_of(graph) != at) return at + ".graph '" + graph + "' is named twice; every text encoder has a graph of its own";
    const std::string tokenizer = e.at("tokenizer").get<std::string>();
    if (!m.at("files").contains(tokenizer))
      return at + ".tokenizer '" + tokenizer + "' is not listed in files (it would be loaded unchecked)";
    for (const char* key : {"output", "mask"})
      if (e.contains(key) && !cond.count(e.at(key).get<std::string>()))
        return at + "." + key + " '" + e.at(key).get<std::string>() + "' is not a conditioning input";
    const Wanted ids{"int64", json::array({e.at("max_length")})};
    wanted[graph] = {{"input_ids", ids}, {"embeddings", Wanted{"float32", rest_of(cond.at(e.at("output").get<std::string>())->at("shape"))}}};
    if (e.contains("mask")) wanted[graph]["attention_mask"] = ids;
  }
  if (classes) {
    const std::string graph = classes->at("graph").get<std::string>();
    const uint64_t n = u64(classes->at("num_classes")), negative = u64(classes->at("negative_row"));
    if (*user_of(graph) != "classes")
      return "classes.graph '" + graph + "' is " + *user_of(graph) + "'s too; the class table has a graph of its own";
    if (negative > n)
      return "classes.negative_row " + std::to_string(negative) + " is not a row of the table (0.." + std::to_string(n) +
             ", the classes then the empty prompt)";
    if (cond.count("class_labels"))
      return std::string("classes is set but the denoiser takes class_labels itself; a class table fills the other inputs");
    wanted[graph] = {{"class_labels", Wanted{"int64", json::array()}}};
    for (const auto& [name, d] : cond) wanted[graph][name] = Wanted{d->at("dtype").get<std::string>(), rest_of(d->at("shape"))};
  }
  for (const auto& name : other_graph_names(m)) {
    if (!wanted.count(name)) return "graphs." + name + " is run by neither the decoder, a text encoder nor the class table";
    std::vector<const json*> tensors;
    for (const char* kind : {"inputs", "outputs"})
      for (const auto& d : graphs.at(name).at(kind)) tensors.push_back(&d);
    std::vector<std::string> have, want;
    for (const json* d : tensors) {
      if (auto p = tensor_problem("graphs." + name + " tensor '" + d->at("name").get<std::string>() + "'", *d, batch)) return p;
      have.push_back(d->at("name").get<std::string>());
    }
    for (const auto& [tensor, _] : wanted.at(name)) want.push_back(tensor);
    std::sort(have.begin(), have.end());
    if (have != want) return "graphs." + name + " has tensors " + join_sorted(have) + "; its user binds " + join_sorted(want);
    for (const json* d : tensors) {
      const std::string tensor = d->at("name").get<std::string>(), dtype = d->at("dtype").get<std::string>();
      const Wanted& w = wanted.at(name).at(tensor);
      const json& shape = d->at("shape");
      if (dtype != w.dtype || (w.rest.is_null() ? shape.size() != 4 : rest_of(shape) != w.rest)) {
        json bound = json::array({"rows"});
        if (w.rest.is_null()) bound.insert(bound.end(), {"H", "W", "C"});
        else bound.insert(bound.end(), w.rest.begin(), w.rest.end());
        return "graphs." + name + " tensor '" + tensor + "' is " + dtype + " " + shape_text(shape) + "; its user binds " +
               w.dtype + " " + shape_text(bound);
      }
    }
  }
  return std::nullopt;
}

Problem listed_rule(const json& m) {
  const json& files = m.at("files");
  std::vector<std::string> graphs(std::begin(kGraphs), std::end(kGraphs));
  for (const auto& name : other_graph_names(m)) graphs.push_back(name);
  for (const auto& name : graphs) {
    const std::string file = m.at("graphs").at(name).at("file").get<std::string>();
    if (!files.contains(file))
      return "graphs." + name + ".file '" + file + "' is not listed in files (it would be loaded unchecked)";
  }
  if (m.contains("engines") && m.at("engines").is_array())
    for (size_t i = 0; i < m.at("engines").size(); ++i) {
      const std::string file = m.at("engines")[i].at("file").get<std::string>();
      if (!files.contains(file))
        return "engines[" + std::to_string(i) + "].file '" + file + "' is not listed in files (it would be loaded unchecked)";
    }
  return std::nullopt;
}

}  // namespace

std::string shape_text(const json& shape) {
  std::string out;
  for (const auto& d : shape) out += (out.empty() ? "" : ", ") + (d.is_string() ? d.get<std::string>() : d.dump());
  return "[" + out + "]";
}

std::optional<std::string> document_problem(const json& manifest) {
  for (auto rule : {sample_rule, conditioning_rule, plan_rule, decoder_rule, graphs_rule, other_graphs_rule, listed_rule})
    if (auto problem = rule(manifest)) return problem;
  return std::nullopt;
}

}  // namespace rstr::validate
