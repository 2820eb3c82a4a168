#!/usr/bin/env node
// Compile src/*.sol with the pinned npm solc and write <Contract>.json (abi + bytecode) into the payout
// package's data folder, services/payouts/artifacts/ (an installed far-mesh loads them with importlib.resources).
//
//   node build.js            write services/payouts/artifacts/*.json
//   node build.js --check    recompile and exit 1 if the artifacts differ from what the sources give
//   node build.js --out DIR  write the artifacts to DIR instead (used by the reproducibility test)
//
// Settings are explicit so the output is reproducible: evmVersion "cancun" (supported by BSC since the
// Tycho/Haber upgrades and by py-evm's CancunVM in eth-tester), optimizer on with 200 runs.
'use strict';
const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const solc = require('solc');

const EVM_VERSION = 'cancun';
const OPTIMIZER = { enabled: true, runs: 200 };
const HERE = __dirname;
const SRC = path.join(HERE, 'src');
const ARTIFACTS = path.join(HERE, '..', 'services', 'payouts', 'artifacts');

function compile() {
  const files = fs.readdirSync(SRC).filter((f) => f.endsWith('.sol')).sort();
  const sources = {};
  for (const f of files) sources[f] = { content: fs.readFileSync(path.join(SRC, f), 'utf8') };
  const input = {
    language: 'Solidity',
    sources,
    settings: {
      evmVersion: EVM_VERSION,
      optimizer: OPTIMIZER,
      outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (output.errors || []).filter((e) => e.severity === 'error');
  for (const e of output.errors || []) process.stderr.write(e.formattedMessage + '\n');
  if (errors.length) process.exit(2);
  const artifacts = {};
  for (const file of files) {
    const sha256 = crypto.createHash('sha256').update(sources[file].content).digest('hex');
    for (const [name, c] of Object.entries(output.contracts[file] || {})) {
      if (!c.evm.bytecode.object) continue; // interfaces
      artifacts[name] = {
        contractName: name,
        sourceName: file,
        sourceSha256: sha256,
        compiler: { name: 'solc', version: solc.version(), evmVersion: EVM_VERSION, optimizer: OPTIMIZER },
        abi: c.abi,
        bytecode: '0x' + c.evm.bytecode.object,
        deployedBytecode: '0x' + c.evm.deployedBytecode.object,
      };
    }
  }
  return artifacts;
}

function render(artifact) {
  return JSON.stringify(artifact, null, 2) + '\n';
}

function main() {
  const args = process.argv.slice(2);
  const check = args.includes('--check');
  const outIndex = args.indexOf('--out');
  const outDir = outIndex >= 0 ? path.resolve(args[outIndex + 1]) : ARTIFACTS;
  const artifacts = compile();
  if (check) {
    let stale = 0;
    for (const [name, artifact] of Object.entries(artifacts)) {
      const file = path.join(ARTIFACTS, name + '.json');
      const committed = fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '';
      if (committed !== render(artifact)) {
        process.stderr.write(`stale: services/payouts/artifacts/${name}.json does not match src/${artifact.sourceName}\n`);
        stale += 1;
      }
    }
    if (stale) process.exit(1);
    process.stdout.write(`ok: ${Object.keys(artifacts).length} artifacts match the sources (solc ${solc.version()})\n`);
    return;
  }
  fs.mkdirSync(outDir, { recursive: true });
  for (const [name, artifact] of Object.entries(artifacts)) {
    fs.writeFileSync(path.join(outDir, name + '.json'), render(artifact));
    process.stdout.write(`wrote ${path.relative(process.cwd(), path.join(outDir, name + '.json'))}\n`);
  }
}

main();
