#!/usr/bin/env node
// Compiles src/*.sol with the pinned solcjs (npm `solc`, wasm: no compiler download) and
// writes artifacts/<Contract>.json = {contractName, sourceName, abi, bytecode,
// deployedBytecode, compiler, settings} for every contract defined under src/.
//
//   node build.js              write artifacts/
//   node build.js --out DIR    write to DIR instead (the test compares DIR with artifacts/)
//   node build.js --check      compile and exit 1 if artifacts/ differ from a fresh build
"use strict";

const fs = require("fs");
const path = require("path");
const solc = require("solc");

const ROOT = __dirname;
const SRC = path.join(ROOT, "src");
const NODE_MODULES = path.join(ROOT, "node_modules");

// Where any node that deploys these contracts runs: py-evm (eth-tester) supports up to
// Prague, anvil and hardhat more; Cancun is the newest fork all of them run.
const SETTINGS = {
  evmVersion: "cancun",
  optimizer: { enabled: true, runs: 200 },
  metadata: { bytecodeHash: "ipfs" },
  outputSelection: {
    "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] },
  },
};

function readInside(base, rel) {
  const full = path.resolve(base, rel);
  if (!full.startsWith(base + path.sep)) throw new Error(`import outside ${base}: ${rel}`);
  return fs.readFileSync(full, "utf8");
}

// Source keys stay relative ("src/X.sol", "@openzeppelin/..."), so the metadata hash in the
// bytecode does not depend on where the checkout lives.
function findImports(p) {
  try {
    if (p.startsWith("src/")) return { contents: readInside(ROOT, p) };
    if (p.startsWith("@openzeppelin/")) return { contents: readInside(NODE_MODULES, p) };
    return { error: `unknown import path ${p}` };
  } catch (e) {
    return { error: String(e.message || e) };
  }
}

function compile() {
  const files = fs.readdirSync(SRC).filter((f) => f.endsWith(".sol")).sort();
  const sources = {};
  for (const f of files) sources[`src/${f}`] = { content: fs.readFileSync(path.join(SRC, f), "utf8") };
  const input = { language: "Solidity", sources, settings: SETTINGS };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  let failed = false;
  let depWarnings = 0;
  for (const e of output.errors || []) {
    if (e.severity === "error") failed = true;
    const file = (e.sourceLocation && e.sourceLocation.file) || "";
    if (e.severity !== "error" && file.startsWith("@openzeppelin/")) {
      depWarnings += 1; // not ours to fix
      continue;
    }
    process.stderr.write((e.formattedMessage || e.message) + "\n");
  }
  if (depWarnings) process.stderr.write(`(${depWarnings} warnings in @openzeppelin sources not shown)\n`);
  if (failed) throw new Error("compilation failed");

  const { outputSelection, ...settings } = SETTINGS;
  const artifacts = {};
  for (const sourceName of Object.keys(sources)) {
    for (const [name, c] of Object.entries(output.contracts[sourceName] || {})) {
      if (!c.evm.bytecode.object) continue; // interfaces / abstract contracts
      artifacts[name] = {
        contractName: name,
        sourceName,
        abi: c.abi,
        bytecode: "0x" + c.evm.bytecode.object,
        deployedBytecode: "0x" + c.evm.deployedBytecode.object,
        compiler: { name: "solc", version: solc.version() },
        settings,
      };
    }
  }
  return artifacts;
}

function serialise(artifact) {
  return JSON.stringify(artifact, null, 2) + "\n";
}

function main(argv) {
  const check = argv.includes("--check");
  const outIdx = argv.indexOf("--out");
  const outDir = outIdx >= 0 ? path.resolve(argv[outIdx + 1]) : path.join(ROOT, "artifacts");
  const artifacts = compile();

  if (check) {
    let stale = 0;
    for (const [name, a] of Object.entries(artifacts)) {
      const file = path.join(outDir, `${name}.json`);
      const have = fs.existsSync(file) ? fs.readFileSync(file, "utf8") : null;
      if (have !== serialise(a)) {
        process.stderr.write(`stale artifact: ${path.relative(process.cwd(), file)}\n`);
        stale += 1;
      }
    }
    if (stale) process.exit(1);
    console.log(`artifacts up to date (${Object.keys(artifacts).length} contracts, solc ${solc.version()})`);
    return;
  }

  fs.mkdirSync(outDir, { recursive: true });
  for (const [name, a] of Object.entries(artifacts)) {
    fs.writeFileSync(path.join(outDir, `${name}.json`), serialise(a));
    const size = (a.deployedBytecode.length - 2) / 2;
    console.log(`${name}: ${size} bytes deployed`);
  }
}

main(process.argv.slice(2));
